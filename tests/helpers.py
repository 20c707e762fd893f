"""Small deterministic stand-ins shared by the test files.

:class:`RandomMDM` is a tiny :class:`MaskedDiffusionModel` with random but seeded weights. Its
log-probs depend on the token ids, their positions and the prompt, and gradients reach every
parameter, so sampler and training code can be tested without a trained model.
:class:`RecordingMDM` also records every forward call. :class:`ScriptedPolicy` is a schedule policy
that outputs an exact knob table, built with :func:`knob_table`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from cogrpo_lightning.mdm.base import Condition, MaskedDiffusionModel
from cogrpo_lightning.schedule.knobs import NUM_KNOBS
from cogrpo_lightning.trajectory import Trajectory


def grid_shape(num_tokens: int) -> tuple[int, int]:
    """Return the most square (h, w) with h * w == num_tokens and h <= w."""
    height = math.isqrt(num_tokens)
    while num_tokens % height:
        height -= 1
    return height, num_tokens // height


def word_id(word: str, vocabulary_size: int) -> int:
    """Hash a word to a row of the word-embedding table, the same in every process (CRC-32)."""
    return zlib.crc32(word.encode("utf-8")) % vocabulary_size


class RandomMDM(MaskedDiffusionModel):
    """A tiny seeded MDM: token and position embeddings, a prompt projection and a linear head.

    The hidden state of position i is ``tanh(embed(id_i) + pos_i + mean_j(embed(id_j) + pos_j) +
    P @ pooled_prompt)``, so every prediction depends on the whole canvas and on the prompt. The
    mask id is ``codebook_size``. Prompts are lower-cased and split on whitespace, and each word is
    hashed into a word-embedding table. Like CLIP-style encoders, every prompt is padded or
    truncated to `max_text_tokens` positions. The empty prompt encodes to padding only, with a zero
    pooled embedding.

    Args:
        num_tokens: L, image tokens per sample, laid out as the most square grid.
        codebook_size: V.
        hidden_size: D, also the size F of the pooled features when `with_features` is True.
        text_size: E, size of the text embeddings.
        text_vocabulary_size: rows of the word-embedding table that words are hashed into.
        max_text_tokens: K, the fixed text length. None pads to the longest prompt of each call
            instead, so prompt and negative conditions can differ in K.
        logit_scale: multiplier of the head's logits; larger values give peakier distributions.
        with_features: offer pooled features [N, D] from :meth:`forward_with_features`.
        output_dtype: dtype of the returned log-probs. bfloat16 imitates a backend that returns
            autocast outputs without casting them back.
        seed: seed of the weight initialisation.
    """

    def __init__(
        self,
        num_tokens: int = 16,
        codebook_size: int = 32,
        *,
        hidden_size: int = 16,
        text_size: int = 8,
        text_vocabulary_size: int = 97,
        max_text_tokens: int | None = 8,
        logit_scale: float = 3.0,
        with_features: bool = False,
        output_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.latent_shape = grid_shape(num_tokens)
        self.hidden_size = hidden_size
        self.text_size = text_size
        self.text_vocabulary_size = text_vocabulary_size
        self.max_text_tokens = max_text_tokens
        self.logit_scale = logit_scale
        self.with_features = with_features
        self.output_dtype = output_dtype

        generator = torch.Generator().manual_seed(seed)

        def random_parameter(*shape: int, scale: float = 1.0) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * scale)

        self.token_embedding = random_parameter(codebook_size + 1, hidden_size)
        self.position_embedding = random_parameter(num_tokens, hidden_size, scale=0.5)
        self.word_embedding = random_parameter(text_vocabulary_size, text_size)
        self.prompt_projection = random_parameter(hidden_size, text_size, scale=text_size**-0.5)
        self.head_weight = random_parameter(codebook_size, hidden_size, scale=hidden_size**-0.5)
        self.head_bias = random_parameter(codebook_size, scale=0.1)

    @property
    def feature_dim(self) -> int | None:
        return self.hidden_size if self.with_features else None

    @property
    def condition_dim(self) -> int:
        return self.text_size

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        word_ids = [[word_id(word, self.text_vocabulary_size) for word in p.lower().split()] for p in prompts]
        if self.max_text_tokens is None:
            length = max([1, *(len(ids) for ids in word_ids)])
        else:
            length = self.max_text_tokens
            word_ids = [ids[:length] for ids in word_ids]
        device = self.word_embedding.device
        padded = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool, device=device)
        for row, ids in enumerate(word_ids):
            padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        hidden = self.word_embedding[padded] * mask.unsqueeze(-1)  # [B, K, E], padding zeroed
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = hidden.sum(dim=1) / counts  # [B, E]
        return Condition(hidden, mask, pooled)

    def forward_with_features(self, token_ids: Tensor, condition: Condition) -> tuple[Tensor, Tensor | None]:
        self.check_token_ids(token_ids)
        embedded = F.embedding(token_ids, self.token_embedding) + self.position_embedding  # [N, L, D]
        prompt = F.linear(condition.pooled, self.prompt_projection)  # [N, E] -> [N, D]
        hidden = torch.tanh(embedded + embedded.mean(dim=1, keepdim=True) + prompt.unsqueeze(1))
        logits = F.linear(hidden, self.head_weight, self.head_bias) * self.logit_scale  # [N, L, V]
        log_probs = torch.log_softmax(logits.float(), dim=-1).to(self.output_dtype)
        features = hidden.float().mean(dim=1) if self.with_features else None  # [N, D]
        return log_probs, features

    def forward(self, token_ids: Tensor, condition: Condition) -> Tensor:
        return self.forward_with_features(token_ids, condition)[0]

    def decode(self, token_ids: Tensor) -> Tensor:
        """Paint each token as one grey pixel of brightness id / (V - 1): [N, 3, h, w]."""
        if bool((token_ids == self.mask_token_id).any()):
            raise ValueError("decode needs complete token grids, but some positions hold the mask id")
        height, width = self.latent_shape
        brightness = token_ids.float() / max(self.codebook_size - 1, 1)
        return brightness.view(-1, 1, height, width).expand(-1, 3, -1, -1).contiguous()


@dataclass
class ForwardCall:
    """One recorded forward call of :class:`RecordingMDM`.

    Attributes:
        token_ids: [N, L] copy of the canvas the model saw.
        condition: the condition object passed in (not copied).
    """

    token_ids: Tensor
    condition: Condition


class RecordingMDM(RandomMDM):
    """A :class:`RandomMDM` that appends every forward call to ``calls`` and counts encodings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[ForwardCall] = []
        self.num_encode_prompts_calls = 0
        self.num_encode_negative_calls = 0

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        self.num_encode_prompts_calls += 1
        return super().encode_prompts(prompts)

    def encode_negative(self, negative_prompt: str = "") -> Condition:
        self.num_encode_negative_calls += 1
        # Call the base encoder directly so that the negative prompt is not counted twice.
        return RandomMDM.encode_prompts(self, [negative_prompt])

    def forward_with_features(self, token_ids: Tensor, condition: Condition) -> tuple[Tensor, Tensor | None]:
        self.calls.append(ForwardCall(token_ids.detach().clone(), condition))
        return super().forward_with_features(token_ids, condition)


class ScriptedPolicy(nn.Module):
    """A schedule policy with exact knob values: each action is the knob vector itself.

    The action of step t is ``table[t]`` plus Gaussian noise with std ``noise_std`` per knob, and
    :meth:`knob_values` is the identity. A knob with std 0 is exact and adds nothing to the
    log-prob. The real :class:`SchedulePolicy` squashes its actions, so it cannot produce an exact
    table such as a non-monotone re-mask ratio.
    """

    def __init__(self, table: Tensor, noise_std: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.table = nn.Parameter(table.float().clone())  # [T, S]
        self.register_buffer("noise_std", torch.tensor(noise_std, dtype=torch.float32))

    @property
    def uses_features(self) -> bool:
        return False

    def _mean(self, step_index: int, num_steps: int, num_samples: int) -> Tensor:
        assert num_steps == self.table.shape[0], "the scripted table has one row per step"
        return self.table[step_index].expand(num_samples, NUM_KNOBS)

    def sample(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        mean = self._mean(step_index, num_steps, num_samples).detach()
        noise = torch.randn(num_samples, NUM_KNOBS, generator=generator, device=mean.device)
        return mean + noise * self.noise_std

    def mean_action(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor:
        return self._mean(step_index, num_steps, num_samples).detach().clone()

    def log_prob(
        self,
        actions: Tensor,
        step_index: int,
        num_steps: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor:
        mean = self._mean(step_index, num_steps, actions.shape[0])
        random_knobs = self.noise_std > 0
        if not bool(random_knobs.any()):
            return actions.new_zeros(actions.shape[0])
        normal = Normal(mean[:, random_knobs], self.noise_std[random_knobs])
        return normal.log_prob(actions[:, random_knobs]).sum(dim=-1)

    def knob_values(self, actions: Tensor, step_index: int, num_steps: int) -> Tensor:
        return actions.clone()


KnobSetting = float | Sequence[float]


def knob_table(
    num_steps: int,
    remask_ratio: KnobSetting,
    sampling_temperature: KnobSetting = 1.0,
    remask_temperature: KnobSetting = 0.0,
    cfg_scale: KnobSetting = 1.0,
) -> Tensor:
    """Build a [T, S] knob table. Each knob is a scalar (constant over the steps) or a list of T values."""
    columns = []
    for value in (remask_ratio, sampling_temperature, remask_temperature, cfg_scale):
        values = value if isinstance(value, (list, tuple)) else [value] * num_steps
        assert len(values) == num_steps
        columns.append(torch.tensor(values, dtype=torch.float64))
    return torch.stack(columns, dim=1)


def linear_ratios(num_steps: int) -> list[float]:
    """Return the linear re-mask ratios r_t = 1 - (t + 1) / T, which reach 0 at the last step."""
    return [1.0 - (t + 1) / num_steps for t in range(num_steps)]


def fill_counts(trajectory: Trajectory) -> list[list[int]]:
    """Return per step the number of tokens each sample filled: T lists of N ints."""
    return [trajectory.fill_mask(t).sum(dim=1).tolist() for t in range(trajectory.num_steps)]
