"""CLIPScore, in the form torchmetrics computes it, as a reward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from cogrpo_lightning.rewards._clip import FrozenClipScorer, load_clip_model, load_tokenizer


class CLIPScoreReward(FrozenClipScorer):
    """CLIPScore: max(100 x cos(image embedding, prompt embedding), 0), one value per image.

    This is the formula of torchmetrics' ``CLIPScore`` / ``clip_score`` (1.9), computed per image
    with a transformers ``CLIPModel``. The default model is torchmetrics' default,
    ``openai/clip-vit-large-patch14`` (hub id or local folder). Its tokenizer is read from the same
    place unless ``tokenizer`` is given.

    torchmetrics itself is not called, for four reasons checked with torchmetrics 1.9.0 and
    transformers 5.25: its ``_get_features`` expects ``get_image_features`` to return a tensor,
    which transformers 5 no longer does, so it raises AttributeError; it returns the batch mean, not
    one score per image; it accepts a local folder only through a callable or a path containing
    "openai"; and it truncates long prompts by slicing ids to 77, which cuts off the end token that
    CLIP pools. Its processor also expects pixel values in [0, 255] (the processor rescales by
    1/255), whereas this class takes the contract's [0, 1] images and preprocesses them in torch:
    bicubic resize of the shorter side, centre crop, CLIP mean/std. Text: 77 tokens with the end
    token kept, truncation logged once.

    Args:
        model: folder or hub id of a ``CLIPModel``.
        tokenizer: folder or hub id of its tokenizer; ``None`` uses ``model``.
        max_batch_size: maximum number of images per forward pass; ``None`` scores the whole batch at once.
    """

    name = "clip_score"

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        tokenizer: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(resize_mode="crop", max_batch_size=max_batch_size)
        self.model = load_clip_model(model)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.freeze()

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return (100.0 * self.cosine_similarity(images, prompts)).clamp_min(0.0)
