"""HPS v2.0 and v2.1 (Human Preference Score v2, Wu et al. 2023, arXiv 2306.09341) as a reward."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cogrpo_lightning.rewards._clip import FrozenClipScorer, ResizeMode, load_clip_model, load_tokenizer
from cogrpo_lightning.rewards.openclip_convert import load_openclip_state_dict, openclip_to_transformers

HPS_HUB_REPO = "xswu/HPSv2"
HPS_CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _resolve_checkpoint(checkpoint: str | None, version: str) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"HPS checkpoint {checkpoint} not found; pass the path of {HPS_CHECKPOINT_FILES[version]} "
                "(or of a folder written by convert_hps_checkpoint), or checkpoint=None to download it"
            )
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(HPS_HUB_REPO, HPS_CHECKPOINT_FILES[version]))


def convert_hps_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    tokenizer: str = "openai/clip-vit-large-patch14",
    vision_heads: int = 16,
    text_heads: int = 16,
) -> Path:
    """Convert an HPS v2 ``.pt`` file once into a transformers folder that loads faster.

    The folder contains the ``CLIPModel`` (``save_pretrained``) and the tokenizer, and can be passed as
    ``HPSv2Reward(checkpoint=output_dir, tokenizer=output_dir)``.
    """
    text_tokenizer = load_tokenizer(tokenizer)
    model = openclip_to_transformers(
        load_openclip_state_dict(checkpoint),
        vision_heads=vision_heads,
        text_heads=text_heads,
        eos_token_id=text_tokenizer.eos_token_id,
        bos_token_id=text_tokenizer.bos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    model.save_pretrained(output_dir)
    text_tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


class HPSv2Reward(FrozenClipScorer):
    """Human Preference Score v2.0 / v2.1: 100 x cos(image embedding, prompt embedding) of a fine-tuned CLIP.

    Loads the official OpenCLIP ViT-H-14 checkpoints ``HPS_v2_compressed.pt`` (v2.0) or
    ``HPS_v2.1_compressed.pt`` (v2.1) from the hub repository ``xswu/HPSv2`` (or from a local file)
    and converts them to a transformers ``CLIPModel`` in memory (about 1B parameters, 3.9 GB in
    float32). A folder written by :func:`convert_hps_checkpoint` loads directly.

    Scale: the hpsv2 package's ``score()`` returns the plain cosine of the normalised embeddings
    (model averages of 0.24 to 0.28 in its benchmark), while its benchmark table and the papers that report HPS v2 (Co-GRPO's
    28.83 -> 29.37 among them) print 100 x the mean cosine. ``scale=100`` (default) matches the
    reported numbers; ``scale=1`` matches ``hpsv2.score``.

    Preprocessing: the hpsv2 scorer's validation transform resizes the longer side to 224 (bicubic)
    and pads with black (``resize_mode="pad"``), then applies the CLIP mean/std. Square images are
    only resized.
    Text: the CLIP BPE tokenizer (OpenCLIP's tokenizer uses the same vocabulary), 77 tokens,
    truncation logged once.

    Args:
        checkpoint: local ``.pt`` file, a folder from :func:`convert_hps_checkpoint`, or ``None`` to
            download the file of ``version`` from the hub (needs network access).
        version: ``"v2.0"`` or ``"v2.1"``; picks the file to download when ``checkpoint`` is None.
        tokenizer: folder or hub id of a CLIP tokenizer.
        scale: factor applied to the cosine.
        backend: ``"transformers"`` (default, needs only transformers) or ``"official"`` (the
            ``hpsv2`` package's own OpenCLIP model and PIL preprocessing, if that package imports).
        vision_heads, text_heads: attention heads of the converted towers (ViT-H-14: 16 and 16).
        resize_mode: ``"pad"`` as hpsv2, or ``"crop"``.
        max_batch_size: maximum number of images per forward pass; ``None`` scores the whole batch at once.
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str | None = None,
        version: Literal["v2.0", "v2.1"] = "v2.1",
        tokenizer: str = "openai/clip-vit-large-patch14",
        scale: float = 100.0,
        backend: Literal["transformers", "official"] = "transformers",
        vision_heads: int = 16,
        text_heads: int = 16,
        resize_mode: ResizeMode = "pad",
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(resize_mode=resize_mode, max_batch_size=max_batch_size)
        if version not in HPS_CHECKPOINT_FILES:
            raise ValueError(f"version must be one of {sorted(HPS_CHECKPOINT_FILES)}, got {version!r}")
        if backend not in ("transformers", "official"):
            raise ValueError(f"backend must be 'transformers' or 'official', got {backend!r}")
        self.version = version
        self.scale = float(scale)
        self.backend = backend
        if backend == "official":
            self._build_official(checkpoint)
        else:
            self._build_transformers(checkpoint, tokenizer, vision_heads, text_heads)
        self.freeze()

    def _build_transformers(self, checkpoint: str | None, tokenizer: str, vision_heads: int, text_heads: int) -> None:
        path = _resolve_checkpoint(checkpoint, self.version)
        self.tokenizer = load_tokenizer(tokenizer)
        if path.is_dir():
            self.model = load_clip_model(str(path))
            return
        self.model = openclip_to_transformers(
            load_openclip_state_dict(path),
            vision_heads=vision_heads,
            text_heads=text_heads,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _build_official(self, checkpoint: str | None) -> None:
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except Exception as error:  # the wheel fails in several ways on current stacks, not only ImportError
            raise ImportError(
                f"backend='official' needs the hpsv2 package, which is not installed or not importable here "
                f"({type(error).__name__}: {error}); the default backend='transformers' needs only transformers"
            ) from error
        # NOTE: this path follows hpsv2's img_score.py but is not exercised by the tests, which cannot
        # install hpsv2 (it pins an old timm and ships without its tokenizer vocabulary).
        model, _, preprocess_val = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device="cpu", light_augmentation=True, output_dict=True
        )
        state_dict = load_openclip_state_dict(_resolve_checkpoint(checkpoint, self.version))
        model.load_state_dict(state_dict)
        self.model = model
        self._official_preprocess = preprocess_val
        self._official_tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def _official_cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        from PIL import Image

        parameter = next(self.model.parameters())
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        batch = torch.stack([self._official_preprocess(Image.fromarray(array)) for array in pixels])
        text = self._official_tokenizer(prompts)
        outputs = self.model(batch.to(parameter.device, parameter.dtype), text.to(parameter.device))
        return (outputs["image_features"] * outputs["text_features"]).sum(dim=-1).float()

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        if self.backend == "official":
            return self.scale * self._official_cosine(images, prompts)
        return self.scale * self.cosine_similarity(images, prompts)
