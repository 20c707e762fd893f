"""The shapes world: object classes, colours, the renderer and the patch codebook.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB on a black background. The image is a ``GRID`` x
``GRID`` grid of ``CELL`` x ``CELL`` pixel cells, and every object covers 2 x 2 cells aligned to the
grid. Because objects are cell-aligned, every image of this world is exactly a grid of codebook
patches: code 0 is an empty cell, and each other code is one quadrant pattern of one shape in one
colour. The tiny MDM generates these codes and :func:`decode_tokens` turns them into pixels.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 32
CELL = 4
GRID = IMAGE_SIZE // CELL
OBJECT_CELLS = 2
OBJECT_SIZE = OBJECT_CELLS * CELL

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Names are GenEval colour names; values are the RGB the renderer paints.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 225, 50),
    "green": (40, 175, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)


def _template(shape: str) -> np.ndarray:
    """Return the binary OBJECT_SIZE x OBJECT_SIZE mask of a shape (rows are y, columns are x)."""
    size = OBJECT_SIZE
    y, x = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    if shape == "circle":
        return (x - centre) ** 2 + (y - centre) ** 2 <= (size / 2 - 0.3) ** 2
    if shape == "square":
        return (x >= 1) & (x <= size - 2) & (y >= 1) & (y <= size - 2)
    if shape == "triangle":
        # apex at the top, base on the bottom row; the half-width grows by half a pixel per row
        return np.abs(x - centre) <= (y + 1) / 2
    if shape == "cross":
        bar = (size // 2 - 1, size // 2)
        return np.isin(x, bar) | np.isin(y, bar)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


TEMPLATES: dict[str, np.ndarray] = {shape: _template(shape) for shape in SHAPES}


def _quadrants(mask: np.ndarray) -> list[np.ndarray]:
    """Split an object mask into its 4 cell patches in raster order (top-left, top-right, ...)."""
    return [
        mask[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        for r in range(OBJECT_CELLS)
        for c in range(OBJECT_CELLS)
    ]


def _unique_patterns() -> list[np.ndarray]:
    patterns: list[np.ndarray] = []
    for shape in SHAPES:
        for quadrant in _quadrants(TEMPLATES[shape]):
            if not any(np.array_equal(quadrant, p) for p in patterns):
                patterns.append(quadrant)
    return patterns


PATTERNS: list[np.ndarray] = _unique_patterns()
# codebook: 0 is the empty cell, then every (pattern, colour) pair
CODEBOOK_SIZE = 1 + len(PATTERNS) * len(COLORS)
NUM_TOKENS = GRID * GRID


def _pattern_index(patch: np.ndarray) -> int:
    for index, pattern in enumerate(PATTERNS):
        if np.array_equal(patch, pattern):
            return index
    raise AssertionError("a template quadrant is missing from PATTERNS")


# code of each quadrant of each (shape, colour): [shape][colour] -> 4 codes in raster order
OBJECT_CODES: dict[str, dict[str, list[int]]] = {
    shape: {
        color: [1 + _pattern_index(q) * len(COLORS) + ci for q in _quadrants(TEMPLATES[shape])]
        for ci, color in enumerate(COLOR_NAMES)
    }
    for shape in SHAPES
}


def codebook_patches() -> Tensor:
    """Return the RGB patch of every code as float [V, 3, CELL, CELL] in [0, 1]."""
    patches = torch.zeros(CODEBOOK_SIZE, 3, CELL, CELL)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1) / 255
    patches[:] = background
    for pi, pattern in enumerate(PATTERNS):
        mask = torch.from_numpy(pattern)
        for ci, color in enumerate(COLOR_NAMES):
            rgb = torch.tensor(COLORS[color], dtype=torch.float32) / 255
            code = 1 + pi * len(COLORS) + ci
            patches[code, :, mask] = rgb.view(3, 1)
    return patches


_PATCHES = codebook_patches()


def decode_tokens(token_ids: Tensor, patches: Tensor | None = None) -> Tensor:
    """Paint complete token grids [N, L] as images [N, 3, IMAGE_SIZE, IMAGE_SIZE] in [0, 1]."""
    table = _PATCHES if patches is None else patches
    table = table.to(token_ids.device)
    n = token_ids.shape[0]
    cells = table[token_ids.long()]  # [N, L, 3, CELL, CELL]
    cells = cells.view(n, GRID, GRID, 3, CELL, CELL).permute(0, 3, 1, 4, 2, 5)  # [N, 3, GRID, CELL, GRID, CELL]
    return cells.reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE)


def encode_images(images: Tensor) -> Tensor:
    """Map images [N, 3, IMAGE_SIZE, IMAGE_SIZE] in [0, 1] to the nearest codes [N, L] cell by cell."""
    n = images.shape[0]
    cells = images.reshape(n, 3, GRID, CELL, GRID, CELL).permute(0, 2, 4, 1, 3, 5)  # [N, GRID, GRID, 3, CELL, CELL]
    cells = cells.reshape(n * NUM_TOKENS, -1)
    table = _PATCHES.to(images.device).reshape(CODEBOOK_SIZE, -1)
    return torch.cdist(cells, table).argmin(dim=1).view(n, NUM_TOKENS)


@dataclass(frozen=True)
class SceneObject:
    """One object: class, colour and the grid cell of its top-left corner."""

    shape: str
    color: str
    row: int
    col: int


def scene_tokens(scene: Sequence[SceneObject]) -> Tensor:
    """Return the exact token grid [L] of a scene."""
    grid = torch.zeros(GRID, GRID, dtype=torch.long)
    for obj in scene:
        codes = OBJECT_CODES[obj.shape][obj.color]
        for q, code in enumerate(codes):
            grid[obj.row + q // OBJECT_CELLS, obj.col + q % OBJECT_CELLS] = code
    return grid.view(-1)


def render(scene: Sequence[SceneObject]) -> Tensor:
    """Render a scene as an image [3, IMAGE_SIZE, IMAGE_SIZE] in [0, 1]."""
    return decode_tokens(scene_tokens(scene).unsqueeze(0))[0]


def _free(occupied: np.ndarray, row: int, col: int) -> bool:
    # objects keep one empty cell between them, so connected components never merge
    r0, r1 = max(row - 1, 0), min(row + OBJECT_CELLS + 1, GRID)
    c0, c1 = max(col - 1, 0), min(col + OBJECT_CELLS + 1, GRID)
    return not occupied[r0:r1, c0:c1].any()


def _occupy(occupied: np.ndarray, row: int, col: int) -> None:
    occupied[row : row + OBJECT_CELLS, col : col + OBJECT_CELLS] = True


_LAST = GRID - OBJECT_CELLS  # largest top-left cell index


def _relative_slots(relation: str, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pick (target, reference) top-left cells that satisfy `relation` clearly along one axis."""
    gap = rng.randint(OBJECT_CELLS + 1, _LAST)  # centre distance in cells along the relation axis
    near = rng.randint(0, _LAST - gap)
    far = near + gap
    across = rng.randint(0, _LAST)
    jitter = min(max(across + rng.choice((-1, 0, 1)), 0), _LAST)
    if relation == "left of":
        return (across, near), (jitter, far)
    if relation == "right of":
        return (across, far), (jitter, near)
    if relation == "above":
        return (near, across), (far, jitter)
    if relation == "below":
        return (far, across), (near, jitter)
    raise ValueError(f"unknown relation {relation!r}; expected left of, right of, above or below")


def sample_scene(metadata: Mapping[str, Any], rng: random.Random, max_tries: int = 200) -> list[SceneObject]:
    """Sample a scene that satisfies a GenEval metadata record (``include`` clauses).

    Unspecified colours are drawn at random for each object. A clause with ``position: [relation, index]`` is placed
    in that relation to the first object of clause ``index``. No other object is added.
    """
    for _ in range(max_tries):
        occupied = np.zeros((GRID, GRID), dtype=bool)
        scene: list[SceneObject] = []
        first_of_clause: list[SceneObject] = []
        ok = True
        for clause in metadata["include"]:
            shape = clause["class"]
            if shape not in TEMPLATES:
                raise ValueError(f"class {shape!r} is not a shapes-world class; expected one of {SHAPES}")
            position = clause.get("position")
            placed: list[SceneObject] = []
            for _ in range(int(clause["count"])):
                color = clause.get("color") or rng.choice(COLOR_NAMES)
                if position is not None and not placed:
                    relation, index = position
                    reference = first_of_clause[index]
                    slots = _relative_slots(relation, rng)
                    # move the reference into its slot if that keeps the scene valid
                    (tr, tc), (rr, rc) = slots
                    occupied[:] = False
                    others = [o for o in scene if o is not reference]
                    for o in others:
                        _occupy(occupied, o.row, o.col)
                    if not (_free(occupied, rr, rc)):
                        ok = False
                        break
                    _occupy(occupied, rr, rc)
                    if not _free(occupied, tr, tc):
                        ok = False
                        break
                    moved = SceneObject(reference.shape, reference.color, rr, rc)
                    scene[scene.index(reference)] = moved
                    first_of_clause[index] = moved
                    obj = SceneObject(shape, color, tr, tc)
                else:
                    cells = [(r, c) for r in range(_LAST + 1) for c in range(_LAST + 1) if _free(occupied, r, c)]
                    if not cells:
                        ok = False
                        break
                    r, c = rng.choice(cells)
                    obj = SceneObject(shape, color, r, c)
                _occupy(occupied, obj.row, obj.col)
                placed.append(obj)
            if not ok:
                break
            scene.extend(placed)
            first_of_clause.append(placed[0])
        if ok:
            return scene
    raise ValueError(f"could not place the objects of {dict(metadata)!r} in {max_tries} tries")
