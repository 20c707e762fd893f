"""GenEval's scoring rules on detections, independent of the detector that produced them.

A record of GenEval's ``evaluation_metadata.jsonl`` has a ``tag`` (one of the six GenEval tasks)
and ``include`` clauses: objects that must be present, optionally with a colour or a position
relative to an earlier clause. It may add ``exclude`` clauses, objects that must number fewer than
``count``, and it has the ``prompt``.

:func:`evaluate_image` judges one image's detections against one record as GenEval does.
Detections scoring above 0.3 (above 0.9 for the ``counting`` tag) are kept, sorted by score, at
most 16 per class, without non-maximum suppression. :func:`summarize` turns many results into
GenEval's per-tag and overall accuracy.

The thresholds and rules match GenEval's ``evaluation/evaluate_images.py``, where a Mask2Former
detector finds the objects and CLIP names their colours. Here colours are read from
``Detection.color``. A detector that cannot tell colours leaves it None, and such a detection
never satisfies a colour clause.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DEFAULT_THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS_PER_CLASS = 16
# Fraction of the summed box sizes that two centres must differ by before a relation counts.
POSITION_MARGIN = 0.1

_INCLUDE_KEYS = ("class", "count", "color", "position")
_EXCLUDE_KEYS = ("class", "count")


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence in [0, 1], box and optional colour name.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels with ``x0 <= x1`` and ``y0 <= y1``, and y grows downward.
    """

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(
                f"Detection score must be in [0, 1], got {self.score} for class {self.class_name!r}"
            )
        if len(self.box) != 4:
            raise ValueError(f"Detection box must be (x0, y0, x1, y1), got {self.box!r}")
        x0, y0, x1, y1 = self.box
        if x1 < x0 or y1 < y0:
            raise ValueError(f"Detection box {self.box!r} has x1 < x0 or y1 < y0; pass (x0, y0, x1, y1)")


@dataclass(frozen=True)
class ImageResult:
    """GenEval's verdict on one image: correctness, the failure reasons (one per line) and the tag."""

    correct: bool
    reason: str
    tag: str


def _prompt_of(metadata: Mapping[str, Any]) -> str:
    prompt = metadata.get("prompt")
    return repr(prompt) if isinstance(prompt, str) else "<no prompt>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _metadata_error(prompt: str, key: str, problem: str) -> ValueError:
    return ValueError(f"invalid GenEval metadata for prompt {prompt}: key {key} {problem}")


def _validate_clause(clause: Any, where: str, allowed: tuple[str, ...], index: int, prompt: str) -> None:
    if not isinstance(clause, Mapping):
        raise _metadata_error(prompt, where, f"must be an object, got {clause!r}")

    for key in clause:
        if key not in allowed:
            raise _metadata_error(prompt, f"{where}.{key}", f"is unknown; expected only {', '.join(allowed)}")
    for key in ("class", "count"):
        if key not in clause:
            raise _metadata_error(prompt, f"{where}.{key}", "is missing")

    if not isinstance(clause["class"], str) or not clause["class"]:
        raise _metadata_error(
            prompt, f"{where}.class", f"must be a non-empty string, got {clause['class']!r}"
        )
    if not _is_int(clause["count"]) or clause["count"] < 1:
        raise _metadata_error(prompt, f"{where}.count", f"must be an integer >= 1, got {clause['count']!r}")
    if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"]):
        raise _metadata_error(
            prompt, f"{where}.color", f"must be a non-empty string, got {clause['color']!r}"
        )

    if "position" not in clause:
        return
    position = clause["position"]
    if not _is_list(position) or len(position) != 2:
        raise _metadata_error(
            prompt, f"{where}.position", f"must be [relation, clause_index], got {position!r}"
        )
    relation, target = position
    if relation not in RELATIONS:
        raise _metadata_error(
            prompt,
            f"{where}.position",
            f"has invalid relation {relation!r}; expected one of {', '.join(RELATIONS)}",
        )
    if not _is_int(target) or not 0 <= target < index:
        earlier = f"0 to {index - 1}" if index > 0 else "none, because this is the first clause"
        raise _metadata_error(
            prompt,
            f"{where}.position",
            f"refers to clause {target!r}, but it can only refer to an earlier include clause ({earlier})",
        )


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``metadata`` is a well-formed GenEval record.

    ``tag`` and a non-empty ``include`` list are required, and ``exclude`` and ``prompt`` are optional.
    Clauses need ``class`` (string) and ``count`` (integer >= 1). Include clauses may add ``color``
    and ``position: [relation, index]``, where ``index`` names an earlier include clause. Unknown keys
    are rejected so that a misspelt key fails here and not as a silently wrong score. Class and colour
    names are not checked, because they depend on the detector's vocabulary. The error names the key
    and the prompt.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"GenEval metadata must be a mapping, got {type(metadata).__name__}")
    prompt = _prompt_of(metadata)
    if "prompt" in metadata and not isinstance(metadata["prompt"], str):
        raise _metadata_error(prompt, "prompt", f"must be a string, got {metadata['prompt']!r}")
    for key in ("tag", "include"):
        if key not in metadata:
            raise _metadata_error(prompt, key, "is missing")
    if not isinstance(metadata["tag"], str) or not metadata["tag"]:
        raise _metadata_error(prompt, "tag", f"must be a non-empty string, got {metadata['tag']!r}")
    include = metadata["include"]
    if not _is_list(include) or not include:
        raise _metadata_error(prompt, "include", f"must be a non-empty list of clauses, got {include!r}")
    for index, clause in enumerate(include):
        _validate_clause(clause, f"include[{index}]", _INCLUDE_KEYS, index, prompt)
    exclude = metadata.get("exclude", [])
    if not _is_list(exclude):
        raise _metadata_error(prompt, "exclude", f"must be a list of clauses, got {exclude!r}")
    for index, clause in enumerate(exclude):
        _validate_clause(clause, f"exclude[{index}]", _EXCLUDE_KEYS, index, prompt)


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Return the relations (``"left of"``, ``"above"``, ...) in which box A is to box B.

    The centre offset A - B is shrunk per axis by ``POSITION_MARGIN`` times the summed box sizes on
    that axis. If both shrunk components are below 1e-3 the boxes have no relation. Otherwise the
    shrunk offset is divided by the length of the raw offset, and a component below -0.5 means
    left of (x) or above (y), above 0.5 means right of or below. Image y grows downward.
    """
    centre_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    centre_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    size_a = (box_a[2] - box_a[0], box_a[3] - box_a[1])
    size_b = (box_b[2] - box_b[0], box_b[3] - box_b[1])
    offset = [centre_a[axis] - centre_b[axis] for axis in range(2)]
    revised = [
        max(abs(offset[axis]) - POSITION_MARGIN * (size_a[axis] + size_b[axis]), 0.0)
        * math.copysign(1.0, offset[axis])
        for axis in range(2)
    ]
    if all(abs(value) < 1e-3 for value in revised):
        return set()
    length = math.hypot(*offset)
    dx, dy = revised[0] / length, revised[1] / length
    relations: set[str] = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def group_detections(
    detections: Iterable[Detection], threshold: float, max_objects: int = MAX_OBJECTS_PER_CLASS
) -> dict[str, list[Detection]]:
    """Group detections scoring above ``threshold`` by class, best first, at most ``max_objects`` per class."""
    groups: dict[str, list[Detection]] = {}
    for detection in detections:
        if detection.score > threshold:
            groups.setdefault(detection.class_name, []).append(detection)
    for class_name, group in groups.items():
        group.sort(key=lambda d: d.score, reverse=True)
        groups[class_name] = group[:max_objects]
    return groups


def _count_colors(found: Sequence[Detection]) -> str:
    counts: dict[str, int] = {}
    for detection in found:
        name = detection.color if detection.color is not None else "unknown"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


def check_clauses(
    detections: Iterable[Detection],
    metadata: Mapping[str, Any],
    threshold: float = DEFAULT_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS_PER_CLASS,
) -> tuple[list[bool], list[str]]:
    """Check every include clause, then every exclude clause, of a GenEval record.

    Returns one pass flag per clause (include clauses first) and the failure reasons in order.
    Raises ValueError if the record is invalid (see :func:`validate_metadata`).
    """
    validate_metadata(metadata)
    used_threshold = counting_threshold if metadata["tag"] == "counting" else threshold
    groups = group_detections(detections, used_threshold, max_objects)
    passed: list[bool] = []
    reasons: list[str] = []
    # objects found for each include clause, or None where the clause failed
    matched: list[list[Detection] | None] = []

    for clause in metadata["include"]:
        class_name, count = clause["class"], clause["count"]
        found = groups.get(class_name, [])[:count]
        ok = True
        if len(found) < count:
            ok = False
            reasons.append(f"expected {class_name}>={count}, found {len(found)}")
        if ok and "color" in clause:
            color = clause["color"]
            with_color = sum(1 for d in found if d.color == color)
            if with_color < count:
                ok = False
                found_colors = _count_colors(found)
                reasons.append(
                    f"expected {color} {class_name}>={count}, found {with_color} {color}; and {found_colors}"
                )
        if ok and "position" in clause:
            relation, target_index = clause["position"]
            targets = matched[target_index]
            if targets is None:
                ok = False
                reasons.append(f"no target for {class_name} to be {relation}")
            else:
                ok = _check_relation(found, targets, class_name, relation, reasons)
        passed.append(ok)
        matched.append(found if ok else None)

    for clause in metadata.get("exclude", []):
        class_name, count = clause["class"], clause["count"]
        present = len(groups.get(class_name, []))
        ok = present < count
        if not ok:
            reasons.append(f"expected {class_name}<{count}, found {present}")
        passed.append(ok)
    return passed, reasons


def _check_relation(
    found: Sequence[Detection],
    targets: Sequence[Detection],
    class_name: str,
    relation: str,
    reasons: list[str],
) -> bool:
    # Every found object must be in the relation to every target. Only the first failing pair is reported.
    for obj in found:
        for target in targets:
            actual = relative_position(obj.box, target.box)
            if relation not in actual:
                described = " and ".join(sorted(actual)) if actual else "no relation to"
                reasons.append(f"expected {class_name} {relation} target, found {described} target")
                return False
    return True


def evaluate_image(
    detections: Iterable[Detection],
    metadata: Mapping[str, Any],
    threshold: float = DEFAULT_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS_PER_CLASS,
) -> ImageResult:
    """Judge one image's detections against a GenEval record; raise ValueError if the record is invalid."""
    passed, reasons = check_clauses(detections, metadata, threshold, counting_threshold, max_objects)
    return ImageResult(correct=all(passed), reason="\n".join(reasons), tag=metadata["tag"])


def clause_score(
    detections: Iterable[Detection],
    metadata: Mapping[str, Any],
    threshold: float = DEFAULT_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS_PER_CLASS,
) -> float:
    """Return the fraction of include and exclude clauses satisfied, a denser reward than correctness.

    It is 1.0 exactly when :func:`evaluate_image` judges the image correct.
    """
    passed, _ = check_clauses(detections, metadata, threshold, counting_threshold, max_objects)
    return sum(passed) / len(passed)


def summarize(results: Iterable[ImageResult]) -> dict[str, Any]:
    """Aggregate results as GenEval reports them.

    Returns ``overall`` (the mean of the per-tag accuracies, so every tag weighs the same whatever
    its number of images), ``per_tag`` (tag -> accuracy), ``counts`` (tag -> ``{"correct", "total"}``),
    ``num_images`` and ``num_correct``. Tags appear in order of first occurrence.
    """
    counts: dict[str, dict[str, int]] = {}
    for result in results:
        entry = counts.setdefault(result.tag, {"correct": 0, "total": 0})
        entry["total"] += 1
        entry["correct"] += int(result.correct)
    if not counts:
        raise ValueError("summarize got no results; pass at least one ImageResult")
    per_tag = {tag: entry["correct"] / entry["total"] for tag, entry in counts.items()}
    return {
        "overall": sum(per_tag.values()) / len(per_tag),
        "per_tag": per_tag,
        "counts": counts,
        "num_images": sum(entry["total"] for entry in counts.values()),
        "num_correct": sum(entry["correct"] for entry in counts.values()),
    }
