"""The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor) as a reward."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cogrpo_lightning.rewards._clip import FrozenClipScorer, load_clip_model

AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


class AestheticMLP(nn.Module):
    """The predictor head, laid out as in the original ``MLP`` class so that its state dict loads as is.

    ``layers`` is Linear(E, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
    Dropout(0.1), Linear(64, 16), Linear(16, 1), with no activations (the "linearMSE" head), so the
    checkpoint keys are ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, embedding_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Map L2-normalised CLIP image embeddings [N, E] to scores [N]."""
        return self.layers(embeddings).squeeze(-1)


def _load_head_state_dict(head: str) -> dict[str, Tensor]:
    if head.startswith(("http://", "https://")):
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / head.rsplit("/", 1)[-1]
        if not path.exists():
            torch.hub.download_url_to_file(head, str(path))
    else:
        path = Path(head).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"aesthetic head {head} not found; pass the path of sac+logos+ava1-l14-linearMSE.pth or its URL"
            )
    return torch.load(path, map_location="cpu", weights_only=True)


class AestheticReward(FrozenClipScorer):
    """LAION aesthetic score (a regression on 1-10 ratings): a linear head on the CLIP ViT-L/14 image embedding.

    Loads the CLIP image tower from ``openai/clip-vit-large-patch14`` (transformers ``CLIPModel``,
    hub id or local folder), the OpenAI weights that the original loads through the ``clip``
    package. The head ``sac+logos+ava1-l14-linearMSE.pth`` comes from the improved-aesthetic-predictor
    GitHub repository (URL, downloaded once into torch's hub cache) or from a local file. As in the original's
    ``simple_inference.py``: embedding = get_image_features(image), L2-normalised, then the head.
    The prompt is not used.

    Preprocessing: bicubic resize of the shorter side to 224, centre crop, CLIP mean/std.

    Args:
        clip_model: folder or hub id of the CLIP model whose image embedding feeds the head.
        head: path or http(s) URL of the head's state dict.
        max_batch_size: maximum number of images per forward pass; ``None`` scores the whole batch at once.
    """

    name = "aesthetic"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        head: str = AESTHETIC_HEAD_URL,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(resize_mode="crop", max_batch_size=max_batch_size)
        self.model = load_clip_model(clip_model)
        self.head = AestheticMLP(self.model.config.projection_dim)
        self.head.load_state_dict(_load_head_state_dict(head), strict=True)
        self.freeze()

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        embeddings = self.image_embeddings(images)  # [N, E] float32, normalised
        head_parameter = next(self.head.parameters())
        with torch.no_grad():
            return self.head(embeddings.to(head_parameter.dtype)).float()
