"""Deterministic GenEval-style prompts for the shapes world, with train and held-out compositions.

Each record has GenEval's metadata schema and prompt grammar: ``tag``, ``include`` clauses
(``class``, ``count``, optional ``color``, optional ``position: [relation, clause_index]``), an
``exclude`` clause for ``counting`` (count + 1, so that extra objects fail), and ``prompt``, such as
"a photo of an orange circle" or "a photo of a circle right of a square".

A tag's composition is what its prompts combine, and the train and held-out splits share none:

- ``single_object``: the class. There are only 4, so both splits contain all four.
- ``two_object``: the unordered pair of two different classes.
- ``counting``: (class, count) with count 2 to 4.
- ``colors``: (class, colour).
- ``position``: (class A, relation, class B) with A != B. "A left of B" and "B right of A" describe
  the same scene, so each composition is split together with its mirror.
- ``color_attr``: two different classes with two different colours, as an unordered pair of
  (class, colour).

A fixed seeded shuffle per tag holds out ``ceil(HELDOUT_FRACTION * n)`` of the ``n`` compositions.
Regenerate the shipped files with
``python -m cogrpo_lightning.benchmarks.shapes.prompts --out-dir cogrpo_lightning/assets/shapes``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cogrpo_lightning.benchmarks.geneval.rules import RELATIONS, validate_metadata
from cogrpo_lightning.benchmarks.shapes.world import COLOR_NAMES, PLURALS, SHAPES

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_FRACTION = 0.25
COUNTS: tuple[int, ...] = (2, 3, 4)
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# Prompts per tag in the shipped files, generated with DEFAULT_SEED.
DEFAULT_NUM_PER_TAG: dict[str, int] = {"train": 60, "heldout": 20}
DEFAULT_SEED = 0

_ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "shapes"

Composition = tuple[Any, ...]


def _with_article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def all_compositions(tag: str) -> list[Composition]:
    """Return every composition of a tag in a fixed order (see the module docstring for their form)."""
    pairs = list(itertools.combinations(SHAPES, 2))
    if tag == "single_object":
        return [(shape,) for shape in SHAPES]
    if tag == "two_object":
        return pairs
    if tag == "counting":
        return [(shape, count) for shape in SHAPES for count in COUNTS]
    if tag == "colors":
        return [(shape, color) for shape in SHAPES for color in COLOR_NAMES]
    if tag == "position":
        return [(a, relation, b) for a, b in pairs for relation in RELATIONS]
    if tag == "color_attr":
        return [
            ((a, color_a), (b, color_b))
            for a, b in pairs
            for color_a in COLOR_NAMES
            for color_b in COLOR_NAMES
            if color_a != color_b
        ]
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")


def split_compositions(tag: str, split: str) -> list[Composition]:
    """Return the compositions of a tag that belong to ``split`` (``"train"`` or ``"heldout"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    compositions = all_compositions(tag)
    if tag == "single_object":
        return compositions
    shuffled = list(compositions)
    random.Random(f"cogrpo-shapes-split/{tag}").shuffle(shuffled)
    num_heldout = math.ceil(HELDOUT_FRACTION * len(shuffled))
    chosen = set(shuffled[:num_heldout] if split == "heldout" else shuffled[num_heldout:])
    return [composition for composition in compositions if composition in chosen]


def composition_of(record: Mapping[str, Any]) -> Composition:
    """Return the composition of a record in the form :func:`all_compositions` uses."""
    tag, include = record["tag"], record["include"]
    if tag == "single_object":
        return (include[0]["class"],)
    if tag == "two_object":
        return tuple(sorted((include[0]["class"], include[1]["class"]), key=SHAPES.index))
    if tag == "counting":
        return (include[0]["class"], include[0]["count"])
    if tag == "colors":
        return (include[0]["class"], include[0]["color"])
    if tag == "position":
        reference, subject = include[0]["class"], include[1]["class"]
        relation = include[1]["position"][0]
        if SHAPES.index(subject) < SHAPES.index(reference):
            return (subject, relation, reference)
        return (reference, INVERSE_RELATION[relation], subject)
    if tag == "color_attr":
        objects = sorted(((c["class"], c["color"]) for c in include), key=lambda item: SHAPES.index(item[0]))
        return tuple(objects)
    raise ValueError(f"unknown tag {tag!r} in record {dict(record)!r}; expected one of {', '.join(TAGS)}")


def make_record(tag: str, composition: Composition, rng: random.Random) -> dict[str, Any]:
    """Build the metadata record of one composition. ``rng`` picks the order of a pair and the phrasing."""
    if tag == "single_object":
        (shape,) = composition
        return {
            "tag": tag,
            "include": [{"class": shape, "count": 1}],
            "prompt": f"a photo of {_with_article(shape)}",
        }
    if tag == "two_object":
        first, second = composition if rng.random() < 0.5 else composition[::-1]
        return {
            "tag": tag,
            "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
            "prompt": f"a photo of {_with_article(first)} and {_with_article(second)}",
        }
    if tag == "counting":
        shape, count = composition
        return {
            "tag": tag,
            "include": [{"class": shape, "count": count}],
            "exclude": [{"class": shape, "count": count + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[count]} {PLURALS[shape]}",
        }
    if tag == "colors":
        shape, color = composition
        return {
            "tag": tag,
            "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": f"a photo of {_with_article(f'{color} {shape}')}",
        }
    if tag == "position":
        a, relation, b = composition
        # The prompt reads "A rel B" or "B inverse(rel) A", and clause 0 is the reference object.
        subject, relation, reference = (
            (a, relation, b) if rng.random() < 0.5 else (b, INVERSE_RELATION[relation], a)
        )
        return {
            "tag": tag,
            "include": [
                {"class": reference, "count": 1},
                {"class": subject, "count": 1, "position": [relation, 0]},
            ],
            "prompt": f"a photo of {_with_article(subject)} {relation} {_with_article(reference)}",
        }
    if tag == "color_attr":
        (shape_a, color_a), (shape_b, color_b) = composition if rng.random() < 0.5 else composition[::-1]
        first, second = _with_article(f"{color_a} {shape_a}"), _with_article(f"{color_b} {shape_b}")
        return {
            "tag": tag,
            "include": [
                {"class": shape_a, "count": 1, "color": color_a},
                {"class": shape_b, "count": 1, "color": color_b},
            ],
            "prompt": f"a photo of {first} and {second}",
        }
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")


def generate(split: str, num_per_tag: int, seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """Generate ``num_per_tag`` records per tag of a split, tags in GenEval's order.

    Compositions are drawn in seeded shuffled rounds, so a tag repeats a composition only when it
    has fewer than ``num_per_tag`` of them, and then every composition appears equally often, give
    or take one. The same arguments always give the same records.
    """
    if num_per_tag < 1:
        raise ValueError(f"num_per_tag must be at least 1, got {num_per_tag}")
    records: list[dict[str, Any]] = []
    for tag in TAGS:
        rng = random.Random(f"cogrpo-shapes-prompts/{seed}/{split}/{tag}")
        compositions = split_compositions(tag, split)
        drawn: list[Composition] = []
        while len(drawn) < num_per_tag:
            round_ = list(compositions)
            rng.shuffle(round_)
            drawn.extend(round_)
        records.extend(make_record(tag, composition, rng) for composition in drawn[:num_per_tag])
    return records


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (GenEval's format) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(record)) + "\n" for record in records]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a GenEval metadata file; raise ValueError naming the line of a bad record."""
    records = []
    with Path(path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_metadata(record)
            except ValueError as error:
                raise ValueError(f"{path}:{line_number}: invalid GenEval record: {error}") from error
            records.append(record)
    return records


def default_prompt_file(split: str) -> Path:
    """Return the path of the shipped prompt file of a split (``"train"`` or ``"heldout"``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = _ASSET_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped prompt file {path} not found; regenerate it with "
            f"python -m cogrpo_lightning.benchmarks.shapes.prompts --out-dir {_ASSET_DIR}"
        )
    return path


def write_default_files(out_dir: str | Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` with the shipped sizes; return their paths."""
    out_dir = Path(out_dir)
    return [
        write_jsonl(generate(split, DEFAULT_NUM_PER_TAG[split], seed), out_dir / f"{split}.jsonl")
        for split in SPLITS
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the shapes-world GenEval prompt files train.jsonl and heldout.jsonl."
    )
    parser.add_argument(
        "--out-dir", required=True, type=Path, help="directory to write train.jsonl and heldout.jsonl into"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the prompt sampling (the split itself is fixed)",
    )
    args = parser.parse_args(argv)
    for path in write_default_files(args.out_dir, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
