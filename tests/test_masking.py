"""Noising helper and loss of masked-token pretraining (C-11)."""

import math

import pytest
import torch

from cogrpo_lightning.mdm.masking import cosine_mask_ratio, mask_tokens, masked_token_loss, num_masked

MASK_ID = 99


def test_mask_tokens_counts_exact_per_row():
    token_ids = torch.arange(48).view(3, 16) % 10
    ratio = torch.tensor([0.0, 0.25, 1.0])

    masked_ids, mask = mask_tokens(token_ids, ratio, MASK_ID, torch.Generator().manual_seed(0))

    assert mask.sum(1).tolist() == [0, 4, 16]
    assert torch.equal(masked_ids == MASK_ID, mask)
    assert torch.equal(masked_ids[~mask], token_ids[~mask])


def test_ratio_is_fraction_masked_not_kept():
    # 0.75 masks 12 of 16, keeping 4: the ratio counts masked positions
    _, mask = mask_tokens(torch.zeros(1, 16, dtype=torch.long), torch.tensor([0.75]), MASK_ID)
    assert int(mask.sum()) == 12


def test_cosine_schedule_values():
    u = torch.tensor([0.0, 1.0 / 3.0, 0.5])
    expected = torch.tensor([1.0, math.cos(math.pi / 6), math.cos(math.pi / 4)])  # 1, 0.8660, 0.7071
    torch.testing.assert_close(cosine_mask_ratio(u), expected, rtol=0, atol=1e-6)


def test_num_masked_rejects_ratio_outside_unit_interval():
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\].*1\.5"):
        num_masked(torch.tensor([0.5, 1.5]), 16)


def test_loss_counts_only_masked_positions():
    # log-probs over V = 2: position 0 predicts target with p = 0.5, position 1 with p = 0.25
    log_probs = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.1, 0.9]]]))
    targets = torch.tensor([[0, 0, 0]])
    mask = torch.tensor([[True, True, False]])

    loss = masked_token_loss(log_probs, targets, mask)

    # mean of -log 0.5 and -log 0.25 = (0.6931 + 1.3863) / 2 = 1.0397; position 2 is ignored
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_loss_with_nothing_masked_is_zero_and_differentiable():
    log_probs = torch.zeros(1, 2, 3, requires_grad=True)
    loss = masked_token_loss(log_probs, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert log_probs.grad is not None
