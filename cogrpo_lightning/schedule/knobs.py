"""The four inference-schedule knobs that Co-GRPO learns, in the fixed order S = 4."""

from __future__ import annotations

# Order of the last dimension of every schedule tensor (actions [..., S] and knob values [..., S]).
KNOB_NAMES: tuple[str, ...] = ("remask_ratio", "sampling_temperature", "remask_temperature", "cfg_scale")
NUM_KNOBS = len(KNOB_NAMES)
REMASK_RATIO, SAMPLING_TEMPERATURE, REMASK_TEMPERATURE, CFG_SCALE = range(NUM_KNOBS)


def knob_index(name: str) -> int:
    """Return the position of a knob in KNOB_NAMES, or raise ValueError naming the valid names."""
    try:
        return KNOB_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown schedule knob {name!r}; expected one of {', '.join(KNOB_NAMES)}") from None
