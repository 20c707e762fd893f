"""The contract every masked diffusion model (MDM) backend implements.

Shapes follow the package legend: N samples, L image tokens (h*w latent grid), V codebook size,
K text tokens, E text hidden size, F pooled feature size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from cogrpo_lightning.schedule.predefined import PredefinedSchedule


@dataclass
class Condition:
    """Prompt embeddings that condition the MDM.

    Attributes:
        hidden: text hidden states [N, K, E].
        mask: [N, K] bool, True where a text token is real (False for padding).
        pooled: pooled text embedding [N, E], used by the state-conditioned schedule policy.
    """

    hidden: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def repeat_interleave(self, repeats: int) -> Condition:
        """Repeat each row `repeats` times in place order: [B, ...] -> [B*repeats, ...]."""
        return Condition(
            self.hidden.repeat_interleave(repeats, dim=0),
            self.mask.repeat_interleave(repeats, dim=0),
            self.pooled.repeat_interleave(repeats, dim=0),
        )

    def expand_to(self, num_rows: int) -> Condition:
        """Broadcast a single-row condition (a negative prompt) to `num_rows` rows without copying."""
        if len(self) != 1:
            raise ValueError(f"expand_to needs a condition with 1 row, got {len(self)} rows")
        return Condition(
            self.hidden.expand(num_rows, -1, -1),
            self.mask.expand(num_rows, -1),
            self.pooled.expand(num_rows, -1),
        )


class MaskedDiffusionModel(nn.Module, ABC):
    """A masked diffusion model behind one interface: prompt encoder, token predictor, decoder.

    Token ids are integers in ``[0, codebook_size)`` for image codes and ``mask_token_id`` for a masked
    position. :meth:`forward` returns float32 log-probabilities over the ``codebook_size`` image codes
    only, so the mask token can never be sampled.

    A new backend subclasses this and implements the abstract members; the sampler, the schedule
    policy and :class:`~cogrpo_lightning.module.CoGRPOModule` use nothing else.
    """

    mask_token_id: int
    codebook_size: int
    latent_shape: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        """Number of image tokens L = h * w."""
        return self.latent_shape[0] * self.latent_shape[1]

    @property
    def feature_dim(self) -> int | None:
        """Size F of pooled features from :meth:`forward_with_features`, or None if not offered."""
        return None

    @property
    def condition_dim(self) -> int:
        """Size E of ``Condition.pooled``."""
        raise NotImplementedError

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """Encode prompts into a :class:`Condition` with one row per prompt."""

    def encode_negative(self, negative_prompt: str = "") -> Condition:
        """Encode the unconditional (negative) prompt for classifier-free guidance as one row."""
        return self.encode_prompts([negative_prompt])

    @abstractmethod
    def forward(self, token_ids: Tensor, condition: Condition) -> Tensor:
        """Predict every position: token_ids [N, L] -> log-probabilities [N, L, V] in float32."""

    def forward_with_features(self, token_ids: Tensor, condition: Condition) -> tuple[Tensor, Tensor | None]:
        """Return :meth:`forward`'s log-probabilities and pooled features [N, F] (None if not offered)."""
        return self(token_ids, condition), None

    @abstractmethod
    def decode(self, token_ids: Tensor) -> Tensor:
        """Decode complete token grids [N, L] into images [N, 3, H, W], float in [0, 1]."""

    def default_schedule(self) -> PredefinedSchedule:
        """Return the backend's hand-designed sampling schedule (the one a zero action reproduces)."""
        from cogrpo_lightning.schedule.predefined import PredefinedSchedule

        return PredefinedSchedule()

    def fsdp_units(self) -> list[nn.Module]:
        """Return the submodules that FSDP2 shards one by one (transformer blocks); the default returns []."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the RL update trains (by default every parameter with requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def check_token_ids(self, token_ids: Tensor) -> None:
        """Raise ValueError if token_ids has the wrong shape or an id outside the vocabulary."""
        if token_ids.ndim != 2 or token_ids.shape[1] != self.num_tokens:
            raise ValueError(
                f"token_ids must have shape [N, {self.num_tokens}], got {list(token_ids.shape)}"
            )
        bad = (token_ids < 0) | ((token_ids >= self.codebook_size) & (token_ids != self.mask_token_id))
        if bool(bad.any()):
            raise ValueError(
                f"token_ids contains ids outside [0, {self.codebook_size}) that are not the mask id "
                f"{self.mask_token_id}, e.g. {int(token_ids[bad][0])}"
            )
