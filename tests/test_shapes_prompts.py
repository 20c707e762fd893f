"""Shapes-world GenEval prompts: grammar, schema, splits and the shipped files."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter

import pytest

from cogrpo_lightning.benchmarks.geneval import validate_metadata
from cogrpo_lightning.benchmarks.shapes.prompts import (
    HELDOUT_FRACTION,
    SPLITS,
    TAGS,
    all_compositions,
    composition_of,
    default_prompt_file,
    generate,
    main,
    make_record,
    read_jsonl,
    split_compositions,
)


class FixedRandom(random.Random):
    """A Random whose random() always returns one value, to pick a record's order or phrasing."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


FIRST, SECOND = FixedRandom(0.0), FixedRandom(0.9)


def records_by_tag(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {tag: [] for tag in TAGS}
    for record in records:
        grouped[record["tag"]].append(record)
    return grouped


def test_shipped_files_regenerate_identically(tmp_path):
    main(["--out-dir", str(tmp_path)])
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == default_prompt_file(split).read_bytes()


def test_shipped_file_sizes():
    train = records_by_tag(read_jsonl(default_prompt_file("train")))
    heldout = records_by_tag(read_jsonl(default_prompt_file("heldout")))
    assert {tag: len(records) for tag, records in train.items()} == dict.fromkeys(TAGS, 60)
    assert {tag: len(records) for tag, records in heldout.items()} == dict.fromkeys(TAGS, 20)
    assert len(default_prompt_file("heldout").read_text(encoding="utf-8").splitlines()) == 120


def test_heldout_compositions_absent_from_train():
    train = records_by_tag(read_jsonl(default_prompt_file("train")))
    heldout = records_by_tag(read_jsonl(default_prompt_file("heldout")))
    for tag in TAGS:
        train_compositions = {composition_of(record) for record in train[tag]}
        heldout_compositions = {composition_of(record) for record in heldout[tag]}
        if tag == "single_object":
            # only four classes exist, so both splits contain all of them
            assert train_compositions == heldout_compositions == set(all_compositions(tag))
        else:
            assert not train_compositions & heldout_compositions, tag


@pytest.mark.parametrize("tag", TAGS[1:])
def test_split_is_partition(tag):
    every = all_compositions(tag)
    train, heldout = split_compositions(tag, "train"), split_compositions(tag, "heldout")
    assert len(heldout) == math.ceil(HELDOUT_FRACTION * len(every))
    assert set(train) | set(heldout) == set(every)
    assert not set(train) & set(heldout)


def test_composition_counts():
    # 4 classes, 6 unordered pairs, counts 2-4, 6 colours, 4 relations, two different colours
    counts = {tag: len(all_compositions(tag)) for tag in TAGS}
    assert counts == {
        "single_object": 4,
        "two_object": 6,
        "counting": 12,
        "colors": 24,
        "position": 24,
        "color_attr": 180,
    }


def test_records_validate_and_stay_in_split():
    for split in SPLITS:
        allowed = {tag: set(split_compositions(tag, split)) for tag in TAGS}
        for record in read_jsonl(default_prompt_file(split)):
            validate_metadata(record)
            assert composition_of(record) in allowed[record["tag"]], record["prompt"]


def test_repeats_only_when_few_compositions():
    train = records_by_tag(generate("train", 60))
    color_attr = Counter(composition_of(record) for record in train["color_attr"])
    assert max(color_attr.values()) == 1  # 135 train compositions, so 60 distinct ones
    colors = Counter(composition_of(record) for record in train["colors"])
    assert len(colors) == 18
    assert set(colors.values()) <= {3, 4}  # 60 prompts over 18 compositions


def test_single_object_grammar():
    record = make_record("single_object", ("circle",), FIRST)
    assert record == {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    }


def test_two_object_grammar():
    assert (
        make_record("two_object", ("circle", "square"), FIRST)["prompt"] == "a photo of a circle and a square"
    )
    record = make_record("two_object", ("circle", "square"), SECOND)
    assert record["prompt"] == "a photo of a square and a circle"
    assert record["include"] == [{"class": "square", "count": 1}, {"class": "circle", "count": 1}]


def test_counting_grammar_and_exclude():
    record = make_record("counting", ("cross", 3), FIRST)
    assert record == {
        "tag": "counting",
        "include": [{"class": "cross", "count": 3}],
        "exclude": [{"class": "cross", "count": 4}],
        "prompt": "a photo of three crosses",
    }


def test_colors_grammar_uses_an():
    assert make_record("colors", ("circle", "orange"), FIRST)["prompt"] == "a photo of an orange circle"
    record = make_record("colors", ("circle", "red"), FIRST)
    assert record["prompt"] == "a photo of a red circle"
    assert record["include"] == [{"class": "circle", "count": 1, "color": "red"}]


def test_position_grammar_and_clauses():
    record = make_record("position", ("circle", "right of", "square"), FIRST)
    assert record["prompt"] == "a photo of a circle right of a square"
    assert record["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["right of", 0]},
    ]
    mirrored = make_record("position", ("circle", "right of", "square"), SECOND)
    assert mirrored["prompt"] == "a photo of a square left of a circle"
    assert composition_of(mirrored) == composition_of(record) == ("circle", "right of", "square")


def test_color_attr_grammar():
    composition = (("circle", "red"), ("square", "orange"))
    assert (
        make_record("color_attr", composition, FIRST)["prompt"]
        == "a photo of a red circle and an orange square"
    )
    record = make_record("color_attr", composition, SECOND)
    assert record["prompt"] == "a photo of an orange square and a red circle"
    assert record["include"] == [
        {"class": "square", "count": 1, "color": "orange"},
        {"class": "circle", "count": 1, "color": "red"},
    ]
    assert composition_of(record) == composition


def test_generate_is_deterministic():
    assert generate("heldout", 20, seed=3) == generate("heldout", 20, seed=3)
    assert generate("heldout", 20, seed=3) != generate("heldout", 20, seed=4)
    assert [record["tag"] for record in generate("train", 2)] == [tag for tag in TAGS for _ in range(2)]


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_per_tag must be at least 1, got 0"):
        generate("train", 0)
    with pytest.raises(ValueError, match="unknown split 'test'; expected one of train, heldout"):
        generate("test", 5)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        default_prompt_file("validation")
    with pytest.raises(ValueError, match="unknown tag 'spatial'; expected one of single_object"):
        all_compositions("spatial")
    with pytest.raises(ValueError, match="unknown tag 'spatial' in record"):
        composition_of({"tag": "spatial", "include": []})
    with pytest.raises(ValueError, match="unknown tag 'spatial'"):
        make_record("spatial", ("circle",), FIRST)


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = json.dumps(make_record("single_object", ("circle",), FIRST))
    bad = json.dumps({"tag": "colors", "prompt": "a photo of a red circle"})
    path.write_text(f"{good}\n\n{bad}\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"prompts.jsonl:3: invalid GenEval record: .*key include is missing"
    ):
        read_jsonl(path)
    path.write_text(f"{good}\n", encoding="utf-8")
    assert read_jsonl(path) == [json.loads(good)]


def test_module_entry_point(tmp_path):
    command = [sys.executable, "-m", "cogrpo_lightning.benchmarks.shapes.prompts", "--out-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"wrote {tmp_path / 'train.jsonl'}" in completed.stdout
    assert (tmp_path / "heldout.jsonl").read_bytes() == default_prompt_file("heldout").read_bytes()
