"""PickScore (the Pick-a-Pic preference model, yuvalkirstain/PickScore_v1) as a reward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from cogrpo_lightning.rewards._clip import FrozenClipScorer, load_clip_model, load_tokenizer


class PickScoreReward(FrozenClipScorer):
    """PickScore: exp(logit_scale) x cos(image embedding, prompt embedding) of a fine-tuned CLIP ViT-H-14.

    Loads the transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (hub id or local folder) and
    the tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the processor that the PickScore model
    card uses. The score is the model card's ``model.logit_scale.exp() * (text_embs @ image_embs.T)``
    for matching rows, with the model's learned logit scale.

    Preprocessing: bicubic resize of the shorter side to the model's image size (224), centre crop,
    CLIP mean/std, as the laion processor config sets them. Text: 77 tokens, truncation logged once.

    Args:
        model: folder or hub id of the PickScore ``CLIPModel``.
        tokenizer: folder or hub id of its tokenizer.
        max_batch_size: maximum number of images per forward pass; ``None`` scores the whole batch at once.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(resize_mode="crop", max_batch_size=max_batch_size)
        self.model = load_clip_model(model)
        self.tokenizer = load_tokenizer(tokenizer)
        self.freeze()

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        logit_scale = self.model.logit_scale.detach().float().exp()
        return logit_scale * self.cosine_similarity(images, prompts)
