"""GenEval benchmark: scoring rules shared by the shapes-world detector and a real GenEval evaluator."""

from cogrpo_lightning.benchmarks.geneval.rules import (
    COUNTING_THRESHOLD,
    DEFAULT_THRESHOLD,
    MAX_OBJECTS_PER_CLASS,
    POSITION_MARGIN,
    RELATIONS,
    Detection,
    ImageResult,
    check_clauses,
    clause_score,
    evaluate_image,
    group_detections,
    relative_position,
    summarize,
    validate_metadata,
)

__all__ = [
    "COUNTING_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "MAX_OBJECTS_PER_CLASS",
    "POSITION_MARGIN",
    "RELATIONS",
    "Detection",
    "ImageResult",
    "check_clauses",
    "clause_score",
    "evaluate_image",
    "group_detections",
    "relative_position",
    "summarize",
    "validate_metadata",
]
