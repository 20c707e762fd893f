"""Shared parts of the CLIP-based scorers: torch-only image preprocessing, prompt tokenisation with
truncation logging, embedding helpers and a frozen scorer base class.

Preprocessing reproduces the torchvision/PIL pipelines of CLIP and OpenCLIP on batched tensors. It
resizes with bicubic interpolation and antialiasing, which differs from PIL's bicubic resize of a
uint8 image by at most 3.5/1000 per pixel (PIL's uint8 rounding). Then it takes the centre crop
(``"crop"``) or pads the longest-side resize with black as the hpsv2 package does (``"pad"``), and
normalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cogrpo_lightning.rewards.base import RewardModel, log_truncation_once

# Mean and std of OpenAI's CLIP training images. OpenCLIP uses them for ViT-H-14 (laion2B) too, and
# they are the values in the preprocessor configs of openai/clip-vit-large-patch14 and
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["crop", "pad"]


def _bicubic(images: Tensor, height: int, width: int) -> Tensor:
    if images.shape[-2:] == (height, width):
        return images
    resized = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    # PIL stores the resized image as uint8, so overshoot of the cubic kernel is clipped to [0, 1]
    return resized.clamp(0.0, 1.0)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` (bicubic) and take the central ``size`` x ``size`` crop.

    Sizes and offsets are rounded as torchvision's ``Resize(size)`` and ``CenterCrop(size)`` do.
    """
    height, width = images.shape[-2:]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    resized = _bicubic(images, new_height, new_width)  # [N, 3, new_height, new_width]
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    return resized[..., top : top + size, left : left + size]  # [N, 3, size, size]


def resize_longest_and_pad(images: Tensor, size: int) -> Tensor:
    """Resize the longer side to ``size`` (bicubic) and pad the shorter one with black, centred.

    This is the validation transform of the hpsv2 package (``ResizeMaxSize`` with fill 0, used because
    its scorer builds the model with ``light_augmentation=True``). For square images it equals
    :func:`resize_center_crop`.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    resized = _bicubic(images, new_height, new_width)
    pad_height, pad_width = size - new_height, size - new_width
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(resized, padding, value=0.0)  # [N, 3, size, size]


def preprocess_images(
    images: Tensor,
    size: int,
    resize_mode: ResizeMode = "crop",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Turn float images [N, 3, H, W] in [0, 1] into normalised CLIP input [N, 3, size, size] (float32)."""
    images = images.float()
    if resize_mode == "crop":
        images = resize_center_crop(images, size)
    elif resize_mode == "pad":
        images = resize_longest_and_pad(images, size)
    else:
        raise ValueError(f"resize_mode must be 'crop' or 'pad', got {resize_mode!r}")
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_tensor) / std_tensor


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor, list[int]]:
    """Tokenise prompts for a CLIP text encoder that reads at most ``max_length`` tokens.

    A longer prompt keeps its start token, its first ``max_length - 2`` text tokens and the end
    token, which is what both transformers' truncation and OpenCLIP's tokenizer produce. Every row
    is padded to ``max_length`` so that a prompt's ids do not depend on the rest of the batch.

    Returns:
        input_ids [N, max_length], eos_positions [N] (index of each row's end token) and the
        untruncated token count of each prompt, for truncation logging.
    """
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=False)["input_ids"]
    token_counts = [len(ids) for ids in encoded]
    rows, eos_positions = [], []
    for ids in encoded:
        ids = list(ids)
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos_id]
        eos_positions.append(len(ids) - 1)
        rows.append(ids + [pad_id] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(eos_positions, dtype=torch.long), token_counts


def load_clip_model(name_or_path: str) -> Any:
    """Load a transformers ``CLIPModel`` from a local directory or a hub id."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(name_or_path)


def load_tokenizer(name_or_path: str) -> Any:
    """Load the (CLIP BPE) tokenizer stored in a local directory or under a hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


class FrozenClipScorer(RewardModel):
    """Base of the scorers built on a transformers ``CLIPModel``: frozen weights, eval mode always.

    Subclasses set ``self.model`` (a CLIPModel) and, if they read prompts, ``self.tokenizer``.
    ``.to(device, dtype)`` moves the model; inputs follow the model's device and dtype.

    Args:
        resize_mode: ``"crop"`` (CLIP, OpenCLIP, transformers processors) or ``"pad"`` (hpsv2).
        max_batch_size: maximum number of images per forward pass; ``None`` scores the whole batch at once.
    """

    model: Any  # a transformers CLIPModel (or, for HPS backend="official", an OpenCLIP model)

    def __init__(self, resize_mode: ResizeMode = "crop", max_batch_size: int | None = None) -> None:
        super().__init__()
        if resize_mode not in ("crop", "pad"):
            raise ValueError(f"resize_mode must be 'crop' or 'pad', got {resize_mode!r}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be None or >= 1, got {max_batch_size}")
        self.resize_mode: ResizeMode = resize_mode
        self.max_batch_size = max_batch_size
        self.tokenizer: Any = None

    def freeze(self) -> None:
        """Switch off gradients and dropout of every weight; call at the end of ``__init__``."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenClipScorer:
        # A reward model is never trained. Lightning switches the whole LightningModule to train
        # mode at the start of fit, which would otherwise turn dropout on inside the scorer.
        return super().train(False)

    def _reference_parameter(self) -> Tensor:
        return next(self.model.parameters())

    def _chunks(self, num_samples: int) -> list[slice]:
        step = self.max_batch_size or max(num_samples, 1)
        return [slice(start, min(start + step, num_samples)) for start in range(0, num_samples, step)]

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """Return the L2-normalised image embeddings [N, E] (float32) of images in [0, 1]."""
        parameter = self._reference_parameter()
        size = self.model.config.vision_config.image_size
        outputs = []
        for part in self._chunks(images.shape[0]):
            pixels = preprocess_images(images[part].to(parameter.device), size, self.resize_mode)
            features = self.model.get_image_features(pixel_values=pixels.to(parameter.dtype))
            # transformers 5 returns a model output whose pooler_output is the projected embedding
            features = features if isinstance(features, Tensor) else features.pooler_output  # [n, E]
            outputs.append(F.normalize(features.float(), dim=-1))
        return torch.cat(outputs)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Return the L2-normalised text embeddings [N, E] (float32), encoding each distinct prompt once.

        The embedding is read at the end token that the tokenizer placed, not by the config's
        ``eos_token_id`` rule. Converted checkpoints and old configs thus pool the same token as
        OpenCLIP, whose argmax of the ids is the end token in CLIP's vocabulary.
        """
        parameter = self._reference_parameter()
        max_length = self.model.config.text_config.max_position_embeddings
        unique_prompts = list(dict.fromkeys(prompts))
        row_of_prompt = {prompt: row for row, prompt in enumerate(unique_prompts)}
        input_ids, eos_positions, token_counts = tokenize_prompts(self.tokenizer, unique_prompts, max_length)
        log_truncation_once(self, [token_counts[row_of_prompt[prompt]] for prompt in prompts], max_length)

        outputs = []
        for part in self._chunks(len(unique_prompts)):
            ids = input_ids[part].to(parameter.device)  # [n, K]
            hidden = self.model.text_model(input_ids=ids).last_hidden_state  # [n, K, D], after final LN
            rows = torch.arange(ids.shape[0], device=ids.device)
            pooled = hidden[rows, eos_positions[part].to(ids.device)]  # [n, D]
            outputs.append(F.normalize(self.model.text_projection(pooled).float(), dim=-1))
        unique_embeddings = torch.cat(outputs)  # [U, E]
        index = torch.tensor([row_of_prompt[prompt] for prompt in prompts], device=parameter.device)
        return unique_embeddings[index]  # [N, E]

    def cosine_similarity(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Return cos(image embedding, text embedding) [N] for matching rows."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
