"""Noising for BERT-style masked-token pretraining (MaskGIT objective).

Ratios here are always the fraction of tokens that are MASKED, never the fraction kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine_mask_ratio(u: Tensor) -> Tensor:
    """Map u ~ U[0, 1) to a masked fraction with MaskGIT's cosine schedule: cos(pi/2 * u).

    u = 0 masks everything and u -> 1 masks almost nothing, so most draws mask many tokens, which is
    the regime of the first sampling steps.
    """
    return torch.cos(0.5 * math.pi * u)


def num_masked(mask_ratio: Tensor, num_tokens: int) -> Tensor:
    """Return how many of `num_tokens` positions each row masks: round(ratio * L), as long [N]."""
    if bool(((mask_ratio < 0) | (mask_ratio > 1)).any()):
        raise ValueError(
            f"mask_ratio must be in [0, 1] (fraction of tokens masked), got values in "
            f"[{float(mask_ratio.min()):.4g}, {float(mask_ratio.max()):.4g}]"
        )
    return torch.round(mask_ratio.double() * num_tokens).long()


def mask_tokens(
    token_ids: Tensor,
    mask_ratio: Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask a uniformly random subset of each row.

    Args:
        token_ids: clean ids [N, L].
        mask_ratio: fraction of each row to mask [N], in [0, 1].
        mask_token_id: id written at masked positions.
        generator: random generator for the choice of positions.

    Returns:
        (masked_ids [N, L], mask [N, L]) where mask is True at masked positions; row i has exactly
        round(mask_ratio[i] * L) True entries.
    """
    n, length = token_ids.shape
    counts = num_masked(mask_ratio.to(token_ids.device), length)  # [N]
    scores = torch.rand(n, length, generator=generator, device=token_ids.device)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [N, L], a random permutation per row
    mask = ranks < counts.unsqueeze(1)
    masked_ids = torch.where(mask, torch.full_like(token_ids, mask_token_id), token_ids)
    return masked_ids, mask


def masked_token_loss(log_probs: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over masked positions only.

    Args:
        log_probs: [N, L, V] float log-probabilities.
        target_ids: clean ids [N, L].
        mask: [N, L] bool, True where the position was masked (and so is predicted).
    """
    nll = -log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [N, L]
    count = mask.sum()
    if int(count) == 0:
        # nothing masked: zero loss that still depends on the parameters, so backward() works
        return (nll * 0.0).sum()
    return (nll * mask).sum() / count
