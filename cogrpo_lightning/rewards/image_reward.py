"""ImageReward v1.0 (github.com/THUDM/ImageReward): a human-preference reward for text-to-image generation.

The scorer loads the official checkpoint ``ImageReward.pt`` and its ``med_config.json`` from the Hugging
Face Hub repo ``THUDM/ImageReward`` (or a local copy) into transformers BLIP modules. ``_blip.py``
describes the architecture and converts the checkpoint keys. The scorer does not need the
``image-reward`` package, whose release 1.5 fails to import on current transformers and pins
timm 0.6.13 and fairscale 0.4.13.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cogrpo_lightning.rewards._clip import preprocess_images
from cogrpo_lightning.rewards.base import RewardModel, log_truncation_once

if TYPE_CHECKING:
    from cogrpo_lightning.rewards._blip import ImageRewardNetwork

DEFAULT_HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILENAME = "ImageReward.pt"
MED_CONFIG_FILENAME = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"

# The official ImageReward.score tokenises with padding="max_length", truncation=True, max_length=35.
MAX_PROMPT_TOKENS = 35

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _looks_like_path(checkpoint: str) -> bool:
    return (
        os.path.isabs(checkpoint)
        or checkpoint.startswith((".", "~"))
        or checkpoint.count("/") != 1
        or checkpoint.endswith(_CHECKPOINT_SUFFIXES)
    )


def _load_state_dict(path: str | Path) -> Mapping[str, Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{path} must contain a state dict (a mapping of names to tensors), got {type(state_dict)}"
        )
    return state_dict


def _load_med_config(med_config: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(med_config, Mapping):
        return med_config
    with open(med_config, encoding="utf-8") as handle:
        return json.load(handle)


def _load_tokenizer(tokenizer: Any) -> Any:
    """Load the BERT tokenizer with the two special tokens that BLIP's init_tokenizer adds.

    BLIP adds ``[DEC]`` as bos_token and ``[ENC]`` as an additional special token, which is why
    med_config.json has 30524 word embeddings for the 30522-token bert-base-uncased vocabulary. The
    official ImageReward keeps ``[CLS]`` as the first token (it does not substitute ``[ENC]``), so the
    added tokens only matter for prompts that contain those literal strings.
    """
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import BertTokenizer

    loaded = BertTokenizer.from_pretrained(str(tokenizer))
    loaded.add_special_tokens({"bos_token": "[DEC]"})
    loaded.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return loaded


class ImageRewardScorer(RewardModel):
    """ImageReward v1.0 human-preference reward on transformers BLIP modules.

    Loads ``ImageReward.pt`` and ``med_config.json`` from the Hugging Face Hub repo ``THUDM/ImageReward``
    (downloaded with ``huggingface_hub.hf_hub_download`` at construction, only when ``checkpoint`` is a
    Hub repo id), or from a local file or directory. The tokenizer defaults to ``bert-base-uncased`` from
    the Hub, or to the checkpoint directory when it contains tokenizer files.

    Scores are the official standardised rewards (raw - 0.1672) / 1.0333, which are unbounded. Prompts
    longer than 35 BERT tokens are truncated as in the original, and the first truncation per scorer is
    logged. Images with non-finite values score NaN. Scoring runs without autograd, in the device and
    dtype of the module, and the weights are frozen.

    Args:
        checkpoint: a local ``.pt`` or ``.safetensors`` file, a directory that contains
            ``checkpoint_filename``, or a Hub repo id ``owner/name``.
        med_config: path to the BLIP BERT config, or its dict. The default is ``med_config.json`` next to
            the checkpoint or in the Hub repo.
        tokenizer: tokenizer path or Hub id, or a loaded tokenizer. The default is described above.
        device: device to move the scorer to. None leaves it on the CPU.
        dtype: floating dtype to cast the weights to. None leaves them in float32.
        backend: ``"transformers"`` (default) or ``"official"``, which wraps the ``image-reward`` package.
        vision_num_heads: attention heads of the ViT. None means width // 64, which is 16 for ViT-L.
        batch_size: max images per forward pass. Larger batches are split.
        checkpoint_filename: checkpoint file name inside a directory or Hub repo.
    """

    name = "image_reward"

    def __init__(
        self,
        checkpoint: str | Path = DEFAULT_HUB_REPO,
        med_config: str | Path | Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "transformers",
        vision_num_heads: int | None = None,
        batch_size: int = 32,
        checkpoint_filename: str = CHECKPOINT_FILENAME,
    ):
        super().__init__()
        if backend not in ("transformers", "official"):
            raise ValueError(f"backend must be 'transformers' or 'official', got {backend!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.batch_size = batch_size
        self.truncated_prompt_count = 0
        self.network: ImageRewardNetwork | None = None
        self.official: torch.nn.Module | None = None

        if backend == "official":
            self.official = _load_official(str(checkpoint), checkpoint_filename, device)
            return

        checkpoint_path, med_config, default_tokenizer = _resolve_files(
            str(checkpoint), checkpoint_filename, med_config
        )
        from cogrpo_lightning.rewards._blip import build_network

        self.network = build_network(
            _load_state_dict(checkpoint_path), _load_med_config(med_config), vision_num_heads=vision_num_heads
        )
        self.tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else default_tokenizer)
        vocab_size = self.network.text.config.vocab_size
        if len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the text encoder has only {vocab_size} "
                "word embeddings. Pass the tokenizer the checkpoint was trained with (bert-base-uncased)."
            )
        self.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path = DEFAULT_HUB_REPO, **kwargs: Any
    ) -> ImageRewardScorer:
        """Build a scorer from a local file, a local directory or a Hub repo id.

        ``kwargs`` go to the constructor.
        """
        return cls(checkpoint=path_or_hub_id, **kwargs)

    @property
    def image_size(self) -> int:
        """Side of the square image the ViT takes (224 for ImageReward v1.0)."""
        if self.network is None:
            return 224
        return self.network.image_size

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenise prompts as the original does, padded and truncated to 35 tokens.

        Each row starts with [CLS] and ends with [SEP]. Returns input ids and attention mask, both [N, 35].
        """
        token_counts = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        self.truncated_prompt_count += sum(count > MAX_PROMPT_TOKENS for count in token_counts)
        log_truncation_once(self, token_counts, MAX_PROMPT_TOKENS)
        encoded = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"]

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        if images.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=images.device)
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        images = images.masked_fill(~finite[:, None, None, None], 0.0)

        if self.official is not None:
            scores = _score_official(self.official, images, prompts)
        else:
            scores = self._score_network(images, prompts)
        return scores.masked_fill(~finite.to(scores.device), float("nan"))

    def _score_network(self, images: Tensor, prompts: list[str]) -> Tensor:
        assert self.network is not None
        parameter = next(self.network.parameters())
        input_ids, attention_mask = self.tokenize(prompts)
        scores = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            # Official preprocessing: Resize(224, BICUBIC), CenterCrop(224), CLIP mean and std.
            pixels = preprocess_images(images[start:stop].to(parameter.device), self.image_size)
            scores.append(
                self.network(
                    pixels.to(parameter.dtype),
                    input_ids[start:stop].to(parameter.device),
                    attention_mask[start:stop].to(parameter.device),
                ).float()
            )
        return torch.cat(scores)


def _resolve_files(
    checkpoint: str, checkpoint_filename: str, med_config: str | Path | Mapping[str, Any] | None
) -> tuple[Path | str, str | Path | Mapping[str, Any], str]:
    """Return the checkpoint path, the med_config and the default tokenizer for ``checkpoint``."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        checkpoint_path = path / checkpoint_filename
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"{checkpoint_filename} not found in the checkpoint directory {path}")
        has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
        default_tokenizer = str(path) if has_tokenizer else DEFAULT_TOKENIZER
        if med_config is None:
            med_config = path / MED_CONFIG_FILENAME
        return checkpoint_path, med_config, default_tokenizer

    if path.is_file():
        if med_config is None:
            med_config = path.parent / MED_CONFIG_FILENAME
            if not med_config.is_file():
                raise FileNotFoundError(
                    f"{MED_CONFIG_FILENAME} not found next to {path}. Pass med_config=PATH."
                )
        return path, med_config, DEFAULT_TOKENIZER

    if _looks_like_path(checkpoint):
        raise FileNotFoundError(
            f"ImageReward checkpoint {checkpoint!r} is neither an existing file or directory nor a Hugging "
            "Face Hub repo id of the form owner/name"
        )
    from huggingface_hub import hf_hub_download

    checkpoint_file = hf_hub_download(repo_id=checkpoint, filename=checkpoint_filename)
    if med_config is None:
        med_config = hf_hub_download(repo_id=checkpoint, filename=MED_CONFIG_FILENAME)
    return checkpoint_file, med_config, DEFAULT_TOKENIZER


def _load_official(
    checkpoint: str, checkpoint_filename: str, device: str | torch.device | None
) -> torch.nn.Module:
    """Load the model of the official ``image-reward`` package (imported as ``ImageReward``)."""
    try:
        import ImageReward as official_package
    except ImportError as error:
        raise ImportError(
            "backend='official' needs the image-reward package (import name ImageReward), which could not "
            f"be imported: {error}. Release 1.5 imports helpers that transformers has moved out of "
            "transformers.modeling_utils, so it does not import on current transformers. The default "
            "backend='transformers' needs only transformers."
        ) from error

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / checkpoint_filename
    if path.is_file():
        name = str(path)
    elif checkpoint == DEFAULT_HUB_REPO:
        name = "ImageReward-v1.0"
    else:
        raise FileNotFoundError(
            f"backend='official' takes a local checkpoint file or {DEFAULT_HUB_REPO!r}, got {checkpoint!r}"
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    return official_package.load(name, device=str(device))


def _score_official(model: torch.nn.Module, images: Tensor, prompts: list[str]) -> Tensor:
    """Score each image with the official ``ImageReward.score(prompt, PIL image)``.

    NOTE: the official model moves inputs to the device given at load time, so moving this scorer with
    ``.to()`` afterwards is not supported for this backend.
    """
    from PIL import Image

    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    scores = [
        float(model.score(prompt, Image.fromarray(array)))
        for prompt, array in zip(prompts, pixels, strict=True)
    ]
    return torch.tensor(scores, dtype=torch.float32)
