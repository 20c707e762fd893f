"""Exact shapes detector: perfect renders, malformed objects, labelling and speed."""

from __future__ import annotations

import random
import time

import pytest
import torch

from cogrpo_lightning.benchmarks.geneval import evaluate_image
from cogrpo_lightning.benchmarks.shapes.detector import detect_objects, label_components
from cogrpo_lightning.benchmarks.shapes.prompts import TAGS, generate
from cogrpo_lightning.benchmarks.shapes.world import (
    COLOR_NAMES,
    GRID,
    IMAGE_SIZE,
    OBJECT_CODES,
    SHAPES,
    SceneObject,
    decode_tokens,
    render,
    sample_scene,
    scene_tokens,
)


def tokens_image(placements: dict[tuple[int, int], int]) -> torch.Tensor:
    """Decode a token grid with the given codes at (row, col) cells and empty cells elsewhere."""
    grid = torch.zeros(GRID, GRID, dtype=torch.long)
    for (row, col), code in placements.items():
        grid[row, col] = code
    return decode_tokens(grid.view(1, -1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("color", COLOR_NAMES)
def test_perfect_render_detected(shape, color):
    image = render([SceneObject(shape, color, row=3, col=5)])
    (detections,) = detect_objects(image.unsqueeze(0))
    assert len(detections) == 1
    found = detections[0]
    assert found.class_name == shape
    assert found.color == color
    assert found.score == 1.0
    # a square's template leaves a one-pixel border inside its 8 x 8 footprint at x = 20, y = 12
    expected = (21.0, 13.0, 27.0, 19.0) if shape == "square" else (20.0, 12.0, 28.0, 20.0)
    assert found.box == expected


def test_scene_detections_in_raster_order():
    scene = [
        SceneObject("cross", "purple", 6, 6),
        SceneObject("circle", "blue", 5, 0),
        SceneObject("square", "red", 0, 0),
        SceneObject("triangle", "orange", 3, 4),
    ]
    (detections,) = detect_objects(render(scene).unsqueeze(0))
    assert [(d.class_name, d.color) for d in detections] == [
        ("square", "red"),
        ("triangle", "orange"),
        ("circle", "blue"),
        ("cross", "purple"),
    ]
    assert [d.score for d in detections] == [1.0, 1.0, 1.0, 1.0]


def test_empty_and_batched_images():
    empty = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    single = render([SceneObject("circle", "red", 0, 0)]).unsqueeze(0)
    pair = render([SceneObject("circle", "red", 0, 0), SceneObject("cross", "green", 5, 5)]).unsqueeze(0)
    results = detect_objects(torch.cat([empty, pair, single, empty]))
    assert [len(r) for r in results] == [0, 2, 1, 0]
    assert detect_objects(empty) == [[]]


def test_half_circle_scores_half():
    # top two quadrants of a circle: 22 of its 44 pixels, so IoU with the circle template is 22 / 44
    codes = OBJECT_CODES["circle"]["red"]
    (detections,) = detect_objects(tokens_image({(2, 2): codes[0], (2, 3): codes[1]}))
    assert len(detections) == 1
    assert detections[0].class_name == "circle"
    assert detections[0].score == pytest.approx(0.5)
    assert detections[0].box == (8.0, 8.0, 16.0, 12.0)


def test_touching_circles_merge():
    # two circles side by side touch at rows 3 and 4; the merged 88 pixels contain one template of 44
    image = render([SceneObject("circle", "green", 0, 0), SceneObject("circle", "green", 0, 2)])
    (detections,) = detect_objects(image.unsqueeze(0))
    assert len(detections) == 1
    assert detections[0].class_name == "circle"
    assert detections[0].score == pytest.approx(0.5)
    assert detections[0].box == (0.0, 0.0, 16.0, 8.0)


def test_mixed_colors_take_majority():
    # three red quadrants (33 pixels) and one blue quadrant (11 pixels) of a whole circle
    red, blue = OBJECT_CODES["circle"]["red"], OBJECT_CODES["circle"]["blue"]
    image = tokens_image({(4, 4): red[0], (4, 5): red[1], (5, 4): red[2], (5, 5): blue[3]})
    (detections,) = detect_objects(image)
    assert len(detections) == 1
    assert detections[0].color == "red"
    assert detections[0].class_name == "circle"
    assert detections[0].score == 1.0


def test_label_components_eight_connected():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours: one component
    mask[0, 4, 4] = True  # isolated pixel
    labels = label_components(mask)
    assert labels[0, 0, 0] == labels[0, 1, 1] == 6  # flat index of (1, 1), the last pixel in raster order
    assert labels[0, 4, 4] == 24
    assert int((labels == -1).sum()) == 22


def test_label_components_spiral():
    # a one-pixel-wide spiral is a single long component
    size = 15
    mask = torch.zeros(size, size, dtype=torch.bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        mask[top, left : right + 1] = True
        mask[top : bottom + 1, right] = True
        mask[bottom, left : right + 1] = True
        mask[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top - 1, left] = True
    labels = label_components(mask.unsqueeze(0))[0]
    assert labels[mask].unique().numel() == 1


def reference_labels(mask: list[list[bool]]) -> list[list[int]]:
    """Label 8-connected components by flood fill, with the same label convention as label_components."""
    h, w = len(mask), len(mask[0])
    labels = [[-1] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            if not mask[y][x] or labels[y][x] != -1:
                continue
            stack, members = [(y, x)], []
            labels[y][x] = 0
            while stack:
                cy, cx = stack.pop()
                members.append((cy, cx))
                for ny in range(cy - 1, cy + 2):
                    for nx in range(cx - 1, cx + 2):
                        if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and labels[ny][nx] == -1:
                            labels[ny][nx] = 0
                            stack.append((ny, nx))
            last = max(my * w + mx for my, mx in members)
            for my, mx in members:
                labels[my][mx] = last
    return labels


@pytest.mark.parametrize("density", [0.3, 0.45, 0.6])
def test_label_components_matches_flood_fill(density):
    generator = torch.Generator().manual_seed(int(density * 100))
    masks = torch.rand(16, 20, 24, generator=generator) < density
    labels = label_components(masks)
    for mask, label in zip(masks, labels, strict=True):
        assert label.tolist() == reference_labels(mask.tolist())


def test_noise_scores_in_range():
    generator = torch.Generator().manual_seed(0)
    results = detect_objects(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    scores = [d.score for detections in results for d in detections]
    assert scores
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_rejects_invalid_images():
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, H, W\], got \[3, 32, 32\]"):
        detect_objects(torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="images must be float in \\[0, 1\\], got dtype torch.uint8"):
        detect_objects(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8))


def test_sampled_scenes_judged_correct():
    # generator, renderer, detector and rules together: every tag's scenes pass over many seeds
    records = generate("train", 60, seed=0) + generate("heldout", 20, seed=0)
    for seed in range(5):
        rng = random.Random(seed)
        images = decode_tokens(torch.stack([scene_tokens(sample_scene(record, rng)) for record in records]))
        for record, detections in zip(records, detect_objects(images), strict=True):
            result = evaluate_image(detections, record)
            assert result.correct, f"seed {seed}, {record['prompt']}: {result.reason}"
    assert {record["tag"] for record in records} == set(TAGS)


def test_detects_512_images_quickly():
    rng = random.Random(1)
    record = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 4}],
        "prompt": "a photo of four circles",
    }
    images = decode_tokens(torch.stack([scene_tokens(sample_scene(record, rng)) for _ in range(512)]))
    start = time.perf_counter()
    results = detect_objects(images)
    elapsed = time.perf_counter() - start
    assert sum(len(r) for r in results) == 4 * 512
    # measured about 0.05 s on 2 CPU threads; the bound leaves room for slow shared CI machines
    assert elapsed < 5.0
