"""The schedule policy pi_phi: a Gaussian over per-step schedule actions, squashed around a predefined schedule.

Shapes: N samples, S = 4 knobs in the order of ``KNOB_NAMES``, S_free <= S knobs that are not frozen,
T steps, F pooled MDM feature size, E prompt-embedding size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from cogrpo_lightning.schedule.knobs import KNOB_NAMES, NUM_KNOBS, REMASK_RATIO
from cogrpo_lightning.schedule.predefined import PredefinedSchedule, validate_num_steps

HEADS: tuple[str, ...] = ("per_step", "state")


def _softplus_inverse(values: Tensor) -> Tensor:
    # log(exp(v) - 1) as v + log(1 - exp(-v)), which does not overflow for large v and is -inf at v = 0
    return values + torch.log(-torch.expm1(-values))


def _squash(actions: Tensor, defaults: Tensor) -> Tensor:
    """Map pre-activation actions [N, S] to knob values [N, S] around defaults [S].

    value = f(a + f_inv(default)), with f = sigmoid for the re-mask ratio and f = softplus for the
    other knobs. An action of exactly 0 returns the default itself, because f(f_inv(d)) can differ
    from d in the last bits. Where f_inv(default) is infinite (ratio 0 or 1, re-mask temperature 0)
    the knob keeps its default for every action. The ratio stays in [0, 1] and the other knobs >= 0.
    """
    is_ratio = torch.zeros(NUM_KNOBS, dtype=torch.bool, device=actions.device)
    is_ratio[REMASK_RATIO] = True

    preimages = torch.where(is_ratio, torch.logit(defaults), _softplus_inverse(defaults))  # [S]
    at_boundary = ~torch.isfinite(preimages)
    preimages = torch.where(at_boundary, 0.0, preimages)
    shifted = actions + preimages  # [N, S]
    # The direct form keeps full relative precision for very negative actions. The residual form
    # d + f(a + z) - f(z) would reach exactly 0.0 near a = -20, and a zero temperature breaks sampling.
    squashed = torch.where(is_ratio, torch.sigmoid(shifted), F.softplus(shifted))
    values = torch.where((actions == 0) | at_boundary, defaults, squashed)
    return torch.where(is_ratio, values.clamp(0.0, 1.0), values.clamp_min(0.0))


class SchedulePolicy(nn.Module):
    """A Gaussian policy over the four schedule knobs of every sampling step.

    At step t it draws a pre-activation action a ~ Normal(mu_t, sigma) in R^S and maps it to knob
    values with a squash around the predefined schedule, so that a = 0 reproduces the predefined
    values bit for bit (see :meth:`knob_values`). Log-probabilities are those of the
    pre-squash Gaussian. A frozen knob always has action 0, keeps its predefined value, adds nothing
    to the log-probability and has no parameter.

    Args:
        num_steps: T, the number of sampling steps the per-step parameters are defined for. A
            schedule for another step count interpolates them in normalised time.
        predefined: the schedule that a = 0 reproduces; None uses ``PredefinedSchedule()``.
        frozen_knobs: names of knobs kept at their predefined value, from remask_ratio,
            sampling_temperature, remask_temperature, cfg_scale.
        init_std: sigma at the start, the std of every free knob's Gaussian in action units (> 0).
        learn_std: learn one log-std per free knob; otherwise sigma stays fixed (see :meth:`set_std`).
        min_std: lower bound on a learned sigma (> 0 and <= init_std).
        head: ``"per_step"`` learns a free mean per step and knob, initialised to 0. ``"state"``
            computes the mean with a small MLP on pooled MDM features, a step embedding and the
            prompt embedding. Its last layer is zero-initialised, so it starts at the predefined schedule.
        feature_dim: F, size of the pooled MDM features the state head reads; None if it reads none.
            The per-step head ignores it.
        condition_dim: E, size of the pooled prompt embedding the state head reads; None if it reads
            none. The per-step head ignores it.
        hidden_dim: width of the state head's two hidden layers.
        step_embedding_dim: size of the state head's sinusoidal embedding of t / (T-1) (even).
    """

    free_knob_indices: Tensor
    log_std: Tensor

    def __init__(
        self,
        num_steps: int,
        predefined: PredefinedSchedule | None = None,
        frozen_knobs: Sequence[str] = (),
        init_std: float = 0.5,
        learn_std: bool = False,
        min_std: float = 1e-3,
        head: Literal["per_step", "state"] = "per_step",
        feature_dim: int | None = None,
        condition_dim: int | None = None,
        hidden_dim: int = 64,
        step_embedding_dim: int = 16,
    ) -> None:
        super().__init__()
        predefined = PredefinedSchedule() if predefined is None else predefined
        problems = _init_arg_problems(num_steps, predefined, frozen_knobs, init_std, min_std, head)
        problems += _network_arg_problems(head, feature_dim, condition_dim, hidden_dim, step_embedding_dim)
        if problems:
            raise ValueError("invalid SchedulePolicy arguments: " + "; ".join(problems))
        self.num_steps = num_steps
        self.predefined = predefined
        self.head = head
        self.learn_std = learn_std
        self.min_std = min_std
        self.feature_dim = feature_dim if head == "state" else None
        self.condition_dim = condition_dim if head == "state" else None
        self.step_embedding_dim = step_embedding_dim
        self.frozen_knobs: tuple[str, ...] = tuple(name for name in KNOB_NAMES if name in set(frozen_knobs))
        self.free_knobs: tuple[str, ...] = tuple(name for name in KNOB_NAMES if name not in self.frozen_knobs)
        free_indices = torch.tensor([KNOB_NAMES.index(name) for name in self.free_knobs], dtype=torch.long)
        self.register_buffer("free_knob_indices", free_indices, persistent=False)
        num_free = len(self.free_knobs)
        if num_free == 0:
            warnings.warn(
                "all four schedule knobs are frozen, so the schedule policy has no parameters and always "
                "returns the predefined schedule",
                UserWarning,
                stacklevel=2,
            )

        log_std = torch.full((num_free,), math.log(init_std))
        if learn_std and num_free > 0:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

        self.step_means: nn.Parameter | None = None
        self.state_net: nn.Sequential | None = None
        if num_free > 0 and head == "per_step":
            self.step_means = nn.Parameter(torch.zeros(num_steps, num_free))  # [T, S_free]
        elif num_free > 0:
            input_dim = (feature_dim or 0) + step_embedding_dim + (condition_dim or 0)
            last = nn.Linear(hidden_dim, num_free)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            layers = [
                nn.Linear(input_dim, hidden_dim),
                nn.SiLU(),
                nn.Linear(hidden_dim, hidden_dim),
                nn.SiLU(),
                last,
            ]
            self.state_net = nn.Sequential(*layers)
        self._defaults_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def uses_features(self) -> bool:
        """Whether the policy reads pooled MDM features [N, F], so the sampler must pass them."""
        return self.feature_dim is not None

    @property
    def uses_prompt_embedding(self) -> bool:
        """Whether the policy reads the pooled prompt embedding [N, E], so the sampler must pass it."""
        return self.condition_dim is not None

    def std(self) -> Tensor:
        """Return sigma of the free knobs [S_free], clamped from below at min_std."""
        return self.log_std.exp().clamp_min(self.min_std)

    @torch.no_grad()
    def set_std(self, std: float) -> None:
        """Set sigma of every free knob, e.g. to decay exploration at a milestone (>= min_std)."""
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= self.min_std):
            raise ValueError(f"std must be a finite number >= min_std={self.min_std}, got {std!r}")
        self.log_std.fill_(math.log(std))

    def distribution(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Normal:
        """Return the Gaussian over the free knobs' actions at step ``step_index`` of ``num_steps``.

        Its batch shape is [N, S_free], columns in the order of ``free_knobs``: frozen knobs have no
        distribution. :meth:`sample`, :meth:`log_prob` and :meth:`entropy` work on full [N, S] actions.

        Args:
            features: [N, F] pooled MDM features; read by the state head only, detached.
            prompt_embedding: [N, E] pooled prompt embedding; read by the state head only, detached.
        """
        loc = self._free_mean(step_index, num_steps, num_samples, features, prompt_embedding)  # [N, S_free]
        return Normal(loc, self.std().to(loc.dtype).expand_as(loc))

    def sample(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw detached actions [N, S]; frozen knobs are exactly 0.

        ``generator`` (on the policy's device) makes the draw reproducible.
        """
        with torch.no_grad():
            dist = self.distribution(step_index, num_steps, num_samples, features, prompt_embedding)
            loc = dist.loc  # [N, S_free]
            noise = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
            return self._scatter(loc + dist.scale * noise)

    def log_prob(
        self,
        actions: Tensor,
        step_index: int,
        num_steps: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor:
        """Return log pi_phi(a) [N] for actions [N, S]: the Gaussian log-density summed over free knobs.

        Frozen columns of ``actions`` are ignored. The result is 0 when every knob is frozen.
        """
        self._check_actions(actions)
        dist = self.distribution(step_index, num_steps, actions.shape[0], features, prompt_embedding)
        free_actions = actions.index_select(-1, self.free_knob_indices)  # [N, S] -> [N, S_free]
        return dist.log_prob(free_actions.to(dist.loc.dtype)).sum(dim=-1)

    def entropy(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor:
        """Return the Gaussian entropy summed over free knobs [N] (0 when every knob is frozen)."""
        dist = self.distribution(step_index, num_steps, num_samples, features, prompt_embedding)
        return dist.entropy().sum(dim=-1)

    def mean_action(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor:
        """Return the detached mean action [N, S] (frozen knobs 0), the deterministic choice for evaluation."""
        with torch.no_grad():
            free_mean = self._free_mean(step_index, num_steps, num_samples, features, prompt_embedding)
            return self._scatter(free_mean)

    def knob_values(self, actions: Tensor, step_index: int, num_steps: int) -> Tensor:
        """Map actions [N, S] to knob values [N, S] around the predefined values of this step.

        ratio = sigmoid(a + logit(default)), other knobs = softplus(a + softplus^-1(default)). An
        action of 0 gives exactly the predefined value, and a frozen knob keeps its predefined value
        whatever its action column holds. The gradient with respect to an action that is exactly 0
        is 0, which the likelihood-ratio update never needs.
        """
        self._check_actions(actions)
        _check_step(step_index, num_steps)
        defaults = self._defaults(num_steps, actions.device, actions.dtype)[step_index]  # [S]
        is_free = torch.zeros(NUM_KNOBS, dtype=torch.bool, device=actions.device)
        is_free[self.free_knob_indices] = True
        return _squash(torch.where(is_free, actions, 0.0), defaults)

    @torch.no_grad()
    def export_schedule(self, num_steps: int | None = None) -> dict[str, list[float]]:
        """Return the mean schedule as plain floats: knob name -> T values, one per step.

        ``num_steps`` defaults to the policy's T; another count interpolates the per-step means.
        Only the per-step head has one schedule: the state head's depends on the prompt and the
        MDM state, so it raises ValueError.
        """
        if self.head != "per_step":
            raise ValueError(
                "export_schedule needs head='per_step'; the state head's schedule depends on the prompt "
                "and the model features, so call mean_action() and knob_values() with them instead"
            )
        num_steps = self.num_steps if num_steps is None else num_steps
        validate_num_steps(num_steps)
        rows = [
            self.knob_values(self.mean_action(step, num_steps, 1), step, num_steps)
            for step in range(num_steps)
        ]
        table = torch.cat(rows).double().cpu()  # T x [1, S] -> [T, S]
        return {name: table[:, index].tolist() for index, name in enumerate(KNOB_NAMES)}

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, head={self.head!r}, free_knobs={list(self.free_knobs)}, "
            f"learn_std={self.learn_std}"
        )

    def _defaults(self, num_steps: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (num_steps, device, dtype)
        if key not in self._defaults_cache:
            self._defaults_cache[key] = self.predefined.values(num_steps, dtype=dtype, device=device)
        return self._defaults_cache[key]

    def _scatter(self, free_values: Tensor) -> Tensor:
        full = free_values.new_zeros(free_values.shape[0], NUM_KNOBS)  # [N, S]
        full[:, self.free_knob_indices] = free_values
        return full

    def _check_actions(self, actions: Tensor) -> None:
        if actions.ndim != 2 or actions.shape[1] != NUM_KNOBS:
            raise ValueError(f"actions must have shape [N, {NUM_KNOBS}], got {list(actions.shape)}")

    def _free_mean(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None,
        prompt_embedding: Tensor | None,
    ) -> Tensor:
        """Return the Gaussian mean of the free knobs [N, S_free]."""
        _check_step(step_index, num_steps)
        if not _is_int_at_least(num_samples, 1):
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if self.state_net is not None:
            return self._state_mean(step_index, num_steps, num_samples, features, prompt_embedding)
        if self.step_means is None:  # every knob frozen
            return self.log_std.new_zeros(num_samples, 0)
        return self._per_step_mean(step_index, num_steps).expand(num_samples, -1)  # [S_free] -> [N, S_free]

    def _per_step_mean(self, step_index: int, num_steps: int) -> Tensor:
        """Return mu_t [S_free], interpolated linearly in normalised time when num_steps != T.

        Step t of ``num_steps`` sits at position t * (T-1) / (num_steps-1) on the grid of the T
        per-step means. Integer arithmetic makes grid points exact, so num_steps == T reads mu_t
        itself. A single-step schedule (num_steps = 1) reads mu_0.
        """
        assert self.step_means is not None
        if num_steps == 1 or self.num_steps == 1:
            return self.step_means[0]
        numerator = step_index * (self.num_steps - 1)
        lower, remainder = divmod(numerator, num_steps - 1)
        if remainder == 0:
            return self.step_means[lower]
        weight = remainder / (num_steps - 1)
        return (1.0 - weight) * self.step_means[lower] + weight * self.step_means[lower + 1]

    def _state_mean(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None,
        prompt_embedding: Tensor | None,
    ) -> Tensor:
        assert self.state_net is not None
        parameter = next(self.state_net.parameters())  # sets the device and dtype of the inputs
        inputs = []
        if self.feature_dim is not None:
            inputs.append(_normalised_input(features, "features", num_samples, self.feature_dim, parameter))
        progress = step_index / max(num_steps - 1, 1)
        frequencies = torch.arange(1, self.step_embedding_dim // 2 + 1, device=parameter.device)
        angles = (math.pi * progress * frequencies).to(parameter.dtype)  # [step_embedding_dim / 2]
        step_embedding = torch.cat([angles.sin(), angles.cos()])  # [step_embedding_dim]
        inputs.append(step_embedding.expand(num_samples, -1))
        if self.condition_dim is not None:
            inputs.append(
                _normalised_input(
                    prompt_embedding, "prompt_embedding", num_samples, self.condition_dim, parameter
                )
            )
        return self.state_net(torch.cat(inputs, dim=-1))  # [N, F + step_embedding_dim + E] -> [N, S_free]


def _normalised_input(
    values: Tensor | None, name: str, num_samples: int, size: int, parameter: Tensor
) -> Tensor:
    """Detach, cast and layer-normalise a state-head input [N, size]; raise ValueError if missing or misshaped."""
    if values is None:
        raise ValueError(f"the state head needs {name} of shape [N, {size}], got None")
    if values.shape != (num_samples, size):
        raise ValueError(f"{name} must have shape [{num_samples}, {size}], got {list(values.shape)}")
    # detached: the schedule loss trains the policy only, never the MDM that produced the inputs
    values = values.detach().to(device=parameter.device, dtype=parameter.dtype)
    return F.layer_norm(values, (size,))


def _check_step(step_index: int, num_steps: int) -> None:
    validate_num_steps(num_steps)
    if not _is_int_at_least(step_index, 0) or step_index >= num_steps:
        raise ValueError(f"step_index must be an integer in [0, {num_steps - 1}], got {step_index!r}")


def _is_int_at_least(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _init_arg_problems(
    num_steps: int,
    predefined: PredefinedSchedule,
    frozen_knobs: Sequence[str],
    init_std: float,
    min_std: float,
    head: str,
) -> list[str]:
    """List what is wrong with the schedule arguments of SchedulePolicy, one message per argument."""
    problems = []
    if not _is_int_at_least(num_steps, 1):
        problems.append(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not isinstance(predefined, PredefinedSchedule):
        problems.append(f"predefined must be a PredefinedSchedule or None, got {type(predefined).__name__}")
    if isinstance(frozen_knobs, str):
        problems.append(
            f"frozen_knobs must be a list of knob names, got the string {frozen_knobs!r}; write [{frozen_knobs!r}]"
        )
    else:
        unknown = [name for name in frozen_knobs if name not in KNOB_NAMES]
        if unknown:
            problems.append(
                f"frozen_knobs contains unknown knob names {unknown}; expected names from {', '.join(KNOB_NAMES)}"
            )
    if not (isinstance(min_std, (int, float)) and math.isfinite(min_std) and min_std > 0):
        problems.append(f"min_std must be a finite number > 0, got {min_std!r}")
    if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std > 0):
        problems.append(f"init_std must be a finite number > 0, got {init_std!r}")
    elif isinstance(min_std, (int, float)) and init_std < min_std:
        problems.append(f"init_std={init_std} is below min_std={min_std}; raise init_std or lower min_std")
    if head not in HEADS:
        problems.append(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    return problems


def _network_arg_problems(
    head: str, feature_dim: int | None, condition_dim: int | None, hidden_dim: int, step_embedding_dim: int
) -> list[str]:
    """List what is wrong with the state-head arguments of SchedulePolicy, one message per argument."""
    problems = []
    for name, value in (("feature_dim", feature_dim), ("condition_dim", condition_dim)):
        if value is not None and not _is_int_at_least(value, 1):
            problems.append(f"{name} must be an integer >= 1 or None, got {value!r}")
    if head == "state" and feature_dim is None and condition_dim is None:
        problems.append(
            "head='state' needs feature_dim or condition_dim (or both); use head='per_step' without them"
        )
    if not _is_int_at_least(hidden_dim, 1):
        problems.append(f"hidden_dim must be an integer >= 1, got {hidden_dim!r}")
    if not _is_int_at_least(step_embedding_dim, 2) or step_embedding_dim % 2:
        problems.append(f"step_embedding_dim must be an even integer >= 2, got {step_embedding_dim!r}")
    return problems
