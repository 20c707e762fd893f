"""GenEval's rules on hand-built detections, with expected values derived by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cogrpo_lightning.benchmarks.geneval import (
    Detection,
    ImageResult,
    clause_score,
    evaluate_image,
    relative_position,
    summarize,
    validate_metadata,
)

GENEVAL_METADATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
)


def det(class_name: str, box=(0.0, 0.0, 8.0, 8.0), score: float = 1.0, color: str | None = None) -> Detection:
    return Detection(class_name=class_name, score=score, box=box, color=color)


def position_record(relation: str = "right of") -> dict:
    return {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of a circle {relation} a square",
    }


COUNTING_TWO = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 2}],
    "exclude": [{"class": "circle", "count": 3}],
    "prompt": "a photo of two circles",
}
RED_CIRCLE = {
    "tag": "colors",
    "include": [{"class": "circle", "count": 1, "color": "red"}],
    "prompt": "a photo of a red circle",
}


def test_relative_position_hand_example():
    # centres (5, 5) and (25, 7): offset (-20, -2), margins 0.1 * 20 = 2 and 0.1 * 16 = 1.6,
    # revised (-18, -0.4), divided by |offset| = sqrt(404): dx = -0.8955, dy = -0.0199
    assert relative_position((0, 0, 10, 10), (20, 4, 30, 10)) == {"left of"}
    assert relative_position((20, 4, 30, 10), (0, 0, 10, 10)) == {"right of"}


def test_relative_position_diagonal():
    # offset (-10, -10), margin 0.1 * 4 = 0.4 per axis: revised -9.6 each, / 14.142 = -0.679 on both axes
    assert relative_position((0, 0, 2, 2), (10, 10, 12, 12)) == {"left of", "above"}
    assert relative_position((10, 10, 12, 12), (0, 0, 2, 2)) == {"right of", "below"}


def test_relative_position_below_half():
    # offset (-10, -10), margin 0.1 * 30 = 3: revised -7 each, / 14.142 = -0.495, which is not beyond -0.5
    assert relative_position((0, 0, 15, 15), (10, 10, 25, 25)) == set()


def test_relative_position_within_margin():
    # offset (-1, 0) is within the margin 0.1 * 20 = 2, so both revised components are 0
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_single_object_correct():
    record = {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    }
    result = evaluate_image([det("circle", score=0.95)], record)
    assert result == ImageResult(correct=True, reason="", tag="single_object")


def test_missing_object_fails():
    record = {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
        "prompt": "a photo of a circle and a square",
    }
    result = evaluate_image([det("circle")], record)
    assert not result.correct
    assert result.reason == "expected square>=1, found 0"
    assert clause_score([det("circle")], record) == 0.5


def test_threshold_is_strict():
    record = {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    }
    at_threshold = evaluate_image([det("circle", score=0.3)], record)
    assert not at_threshold.correct
    assert at_threshold.reason == "expected circle>=1, found 0"
    assert evaluate_image([det("circle", score=0.31)], record).correct


def test_counting_needs_high_score():
    detections = [det("circle", score=0.95), det("circle", (20, 20, 28, 28), score=0.85)]
    result = evaluate_image(detections, COUNTING_TWO)
    assert not result.correct
    assert result.reason == "expected circle>=2, found 1"
    # the same detections pass under the default threshold of any other tag
    other_tag = {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 2}],
        "prompt": "a photo of two circles",
    }
    assert evaluate_image(detections, other_tag).correct


def test_counting_exclude_fails_on_extra():
    detections = [det("circle", (x, 0, x + 8, 8)) for x in (0, 12, 24)]
    result = evaluate_image(detections, COUNTING_TWO)
    assert not result.correct
    assert result.reason == "expected circle<3, found 3"
    assert clause_score(detections, COUNTING_TWO) == 0.5


def test_counting_exact_count_passes():
    detections = [det("circle", (x, 0, x + 8, 8)) for x in (0, 12)]
    assert evaluate_image(detections, COUNTING_TWO).correct


def test_exclude_sees_at_most_16():
    # 20 detections are cut to the 16 best, and 16 < 17 satisfies the exclude clause
    record = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 1}],
        "exclude": [{"class": "circle", "count": 17}],
        "prompt": "a photo of a circle",
    }
    detections = [det("circle", (x, 0, x + 1, 1)) for x in range(20)]
    assert evaluate_image(detections, record).correct
    record["exclude"][0]["count"] = 16
    result = evaluate_image(detections, record)
    assert result.reason == "expected circle<16, found 16"


def test_wrong_color_fails():
    result = evaluate_image([det("circle", color="blue")], RED_CIRCLE)
    assert not result.correct
    assert result.reason == "expected red circle>=1, found 0 red; and 1 blue"


def test_unknown_color_never_matches():
    result = evaluate_image([det("circle", color=None)], RED_CIRCLE)
    assert result.reason == "expected red circle>=1, found 0 red; and 1 unknown"


def test_color_checks_best_scores_only():
    # the best-scoring circle is blue, so the red one with a lower score is not looked at
    detections = [
        det("circle", score=0.5, color="red"),
        det("circle", (20, 0, 28, 8), score=0.9, color="blue"),
    ]
    assert not evaluate_image(detections, RED_CIRCLE).correct
    detections = [
        det("circle", score=0.9, color="red"),
        det("circle", (20, 0, 28, 8), score=0.5, color="blue"),
    ]
    assert evaluate_image(detections, RED_CIRCLE).correct


def test_position_correct():
    detections = [det("square", (0, 0, 8, 8)), det("circle", (20, 2, 28, 10))]
    result = evaluate_image(detections, position_record("right of"))
    assert result == ImageResult(correct=True, reason="", tag="position")


def test_position_index_zero_is_valid():
    # clause index 0 is falsy in Python but is a valid reference to the first clause
    record = position_record("left of")
    validate_metadata(record)
    detections = [det("square", (20, 0, 28, 8)), det("circle", (0, 0, 8, 8))]
    assert evaluate_image(detections, record).correct


def test_wrong_relation_fails():
    detections = [det("square", (20, 0, 28, 8)), det("circle", (0, 0, 8, 8))]
    result = evaluate_image(detections, position_record("right of"))
    assert not result.correct
    assert result.reason == "expected circle right of target, found left of target"
    assert clause_score(detections, position_record("right of")) == 0.5


def test_overlapping_boxes_have_no_relation():
    detections = [det("square", (0, 0, 8, 8)), det("circle", (1, 0, 9, 8))]
    result = evaluate_image(detections, position_record("right of"))
    assert result.reason == "expected circle right of target, found no relation to target"


def test_missing_reference_fails():
    result = evaluate_image([det("circle")], position_record())
    assert not result.correct
    assert result.reason == "expected square>=1, found 0\nno target for circle to be right of"
    assert clause_score([det("circle")], position_record()) == 0.0


def test_reference_with_wrong_color_is_no_target():
    record = position_record()
    record["include"][0]["color"] = "red"
    detections = [det("square", (0, 0, 8, 8), color="blue"), det("circle", (20, 0, 28, 8))]
    result = evaluate_image(detections, record)
    assert result.reason.splitlines()[-1] == "no target for circle to be right of"


def test_every_object_must_satisfy_relation():
    record = position_record()
    record["include"][1]["count"] = 2
    detections = [
        det("square", (12, 0, 20, 8)),
        det("circle", (24, 0, 32, 8)),
        det("circle", (0, 0, 8, 8), score=0.9),
    ]
    result = evaluate_image(detections, record)
    assert result.reason == "expected circle right of target, found left of target"


def test_summarize_mean_of_tags():
    results = [
        ImageResult(True, "", "counting"),
        ImageResult(False, "expected circle>=2, found 1", "counting"),
        ImageResult(True, "", "colors"),
    ]
    summary = summarize(results)
    # tag accuracies 0.5 and 1.0 average to 0.75, while the image mean would be 2 / 3
    assert summary["overall"] == 0.75
    assert summary["per_tag"] == {"counting": 0.5, "colors": 1.0}
    assert summary["counts"] == {"counting": {"correct": 1, "total": 2}, "colors": {"correct": 1, "total": 1}}
    assert summary["num_images"] == 3
    assert summary["num_correct"] == 2


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="summarize got no results"):
        summarize([])


def test_detection_rejects_bad_values():
    with pytest.raises(ValueError, match=r"score must be in \[0, 1\], got 1.5 for class 'circle'"):
        det("circle", score=1.5)
    with pytest.raises(ValueError, match=r"box \(8, 0, 0, 8\) has x1 < x0"):
        det("circle", box=(8, 0, 0, 8))
    with pytest.raises(ValueError, match="box must be"):
        det("circle", box=(0, 0, 8))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda r: r.pop("tag"),
            "invalid GenEval metadata for prompt 'a photo of a circle right of a square': key tag is missing",
        ),
        (lambda r: r.pop("include"), "key include is missing"),
        (lambda r: r.update(include=[]), "key include must be a non-empty list"),
        (lambda r: r.update(tag=3), "key tag must be a non-empty string, got 3"),
        (lambda r: r["include"][0].pop("class"), "key include\\[0\\].class is missing"),
        (lambda r: r["include"][0].pop("count"), "key include\\[0\\].count is missing"),
        (lambda r: r["include"][0].update(count=0), "include\\[0\\].count must be an integer >= 1, got 0"),
        (
            lambda r: r["include"][0].update(count=True),
            "include\\[0\\].count must be an integer >= 1, got True",
        ),
        (
            lambda r: r["include"][0].update(colour="red"),
            "include\\[0\\].colour is unknown; expected only class, count, color, position",
        ),
        (lambda r: r["include"][0].update(color=""), "include\\[0\\].color must be a non-empty string"),
        (
            lambda r: r["include"][1].update(position=["behind", 0]),
            "invalid relation 'behind'.*expected one of left of",
        ),
        (
            lambda r: r["include"][1].update(position=["above"]),
            "include\\[1\\].position must be \\[relation, clause_index\\]",
        ),
        (
            lambda r: r["include"][1].update(position=["above", 1]),
            "refers to clause 1, but it can only refer to an earlier",
        ),
        (
            lambda r: r["include"][1].update(position=["above", 5]),
            "refers to clause 5, .*earlier include clause \\(0 to 0\\)",
        ),
        (lambda r: r["include"][1].update(position=["above", -1]), "refers to clause -1"),
        (
            lambda r: r["include"][0].update(position=["above", 0]),
            "include\\[0\\].position refers to clause 0, .*\\(none, because this is the first clause\\)",
        ),
        (
            lambda r: r.update(exclude=[{"class": "circle", "count": 2, "color": "red"}]),
            "exclude\\[0\\].color is unknown",
        ),
        (lambda r: r.update(exclude="circle"), "key exclude must be a list"),
        (lambda r: r.update(prompt=7), "key prompt must be a string, got 7"),
    ],
)
def test_validate_metadata_rejects(change, match):
    record = position_record()
    change(record)
    with pytest.raises(ValueError, match=match):
        validate_metadata(record)


def test_evaluate_rejects_invalid_record():
    with pytest.raises(ValueError, match="for prompt <no prompt>: key include is missing"):
        evaluate_image([], {"tag": "colors"})
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        clause_score([], [])


def test_geneval_metadata_file_validates():
    if not GENEVAL_METADATA.is_file():
        pytest.skip(f"GenEval metadata not found at {GENEVAL_METADATA}")
    lines = [line for line in GENEVAL_METADATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) > 0
    tags = set()
    for line in lines:
        record = json.loads(line)
        validate_metadata(record)
        tags.add(record["tag"])
        # with no detections every record is judged, and judged wrong
        assert not evaluate_image([], record).correct
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert math.isclose(summarize([ImageResult(False, "", tag) for tag in tags])["overall"], 0.0)
