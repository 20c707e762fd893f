"""Exact object detector for shapes-world images, producing GenEval detections.

Every connected component of non-background pixels (8-connectivity) is one detection. Its colour
is the majority vote of the nearest named colour of each of its pixels, so a component painted in
palette colours gets the colour of most of its pixels. Its class is the template of
:data:`~cogrpo_lightning.benchmarks.shapes.world.TEMPLATES` whose mask, cropped to its own bounding
box and aligned to the component's top-left corner, has the best IoU with the component's mask, and
its score is that IoU. A perfect render therefore scores 1.0 with the right class, colour and box,
while half shapes, merged objects and stray pixels score lower. Ties between templates go to the
first class in ``SHAPES``, and ties in the colour vote to the first name in ``COLOR_NAMES``.

Boxes are the tight pixel extent ``(x0, y0, x1, y1)`` with exclusive ``x1`` and ``y1``. A square's
box is 6 x 6 pixels inside its 8 x 8 footprint, because its template leaves a one-pixel border.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cogrpo_lightning.benchmarks.geneval.rules import Detection
from cogrpo_lightning.benchmarks.shapes.world import BACKGROUND, COLOR_NAMES, COLORS, SHAPES, TEMPLATES
from cogrpo_lightning.rewards.base import check_images


def _cropped_templates() -> list[Tensor]:
    """Return each template of SHAPES cropped to the bounding box of its pixels."""
    crops = []
    for shape in SHAPES:
        mask = torch.from_numpy(TEMPLATES[shape])
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        crops.append(mask[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1].clone())
    return crops


_CROPS: list[Tensor] = _cropped_templates()
# Row 0 is the background and row k >= 1 is COLOR_NAMES[k - 1], with values in [0, 1].
_PALETTE = torch.tensor([BACKGROUND] + [COLORS[name] for name in COLOR_NAMES], dtype=torch.float32) / 255


def classify_pixels(images: Tensor) -> Tensor:
    """Classify each pixel of images [N, 3, H, W] by the nearest palette entry.

    Returns int64 [N, H, W]: 0 for background, k >= 1 for ``COLOR_NAMES[k - 1]``.
    """
    classes = torch.zeros(
        images.shape[0], images.shape[2], images.shape[3], dtype=torch.long, device=images.device
    )
    # an exactly black pixel is background, and skipping those makes decoded images cheap to classify
    candidates = images.amax(dim=1) > 0
    pixels = images.permute(0, 2, 3, 1)[candidates]
    if pixels.numel() > 0:
        classes[candidates] = torch.cdist(pixels, _PALETTE.to(pixels.device)).argmin(dim=1)
    return classes


def _neighbourhood_max(labels: Tensor) -> Tensor:
    """Return the max over each pixel's 3 x 3 neighbourhood of labels [N, H, W], outside counting as -1."""
    padded = F.pad(labels, (1, 1, 1, 1), value=-1)
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def label_components(foreground: Tensor) -> Tensor:
    """Label the 8-connected components of a boolean mask [N, H, W].

    Returns int64 [N, H, W]: -1 on background, and on each component the flat index ``y * W + x``
    of its last pixel in raster order, so labels are unique within an image.
    """
    n, h, w = foreground.shape
    index = torch.arange(h * w, device=foreground.device).view(1, h, w).expand(n, h, w)
    labels = torch.where(foreground, index, torch.full_like(index, -1)).reshape(n, h * w)
    flat_foreground = foreground.reshape(n, h * w)
    # Invariant: the label of a foreground pixel is the index of a pixel of the same component whose
    # own label is at least as large. Each round takes the max over the 3 x 3 neighbourhood, hooks
    # that max onto the pixel that the old label points to, and then follows pointers twice.
    # Random token images converge in about 5 rounds, where neighbour max alone needs about 55.
    while True:
        neighbour_max = _neighbourhood_max(labels.view(n, h, w)).reshape(n, h * w)
        neighbour_max = torch.where(flat_foreground, neighbour_max, labels)
        # background pixels point at index 0 with the value -1, which changes no label
        hooked = labels.scatter_reduce(1, labels.clamp(min=0), neighbour_max, reduce="amax")
        hooked = torch.maximum(hooked, neighbour_max)
        for _ in range(2):
            hooked = hooked.gather(1, hooked.clamp(min=0))
        updated = torch.where(flat_foreground, hooked, labels)
        if torch.equal(updated, labels):
            return labels.view(n, h, w)
        labels = updated


def detect_objects(images: Tensor) -> list[list[Detection]]:
    """Detect the objects of images [N, 3, H, W] in [0, 1]; return one list of detections per image.

    Each image's detections are in raster order of their boxes' top-left corners. The work runs on
    the CPU whatever the images' device.
    """
    check_images(images)
    images = images.detach().to("cpu", torch.float32)
    n, _, h, w = images.shape
    color_index = classify_pixels(images)
    foreground = color_index > 0
    labels = label_components(foreground)
    results: list[list[Detection]] = [[] for _ in range(n)]
    if not bool(foreground.any()):
        return results

    image_ids, ys, xs = foreground.nonzero(as_tuple=True)
    keys = image_ids * (h * w) + labels[image_ids, ys, xs]
    unique_keys, component = torch.unique(keys, return_inverse=True)
    count = unique_keys.numel()

    def reduce(values: Tensor, reduction: str, initial: int) -> Tensor:
        out = torch.full((count,), initial, dtype=torch.long)
        return out.scatter_reduce(0, component, values, reduce=reduction, include_self=True)

    y0, x0 = reduce(ys, "amin", h), reduce(xs, "amin", w)
    y1, x1 = reduce(ys, "amax", -1), reduce(xs, "amax", -1)
    area = torch.bincount(component, minlength=count)

    num_colors = len(COLOR_NAMES)
    votes = torch.bincount(
        component * num_colors + color_index[image_ids, ys, xs] - 1, minlength=count * num_colors
    )
    colors = votes.view(count, num_colors).argmax(dim=1)

    # IoU of each component against each cropped template placed at the component's top-left corner
    rel_y, rel_x = ys - y0[component], xs - x0[component]
    ious = torch.empty(count, len(_CROPS))
    for t, crop in enumerate(_CROPS):
        crop_h, crop_w = crop.shape
        inside = (rel_y < crop_h) & (rel_x < crop_w)
        on_template = crop[rel_y.clamp(max=crop_h - 1), rel_x.clamp(max=crop_w - 1)]
        intersection = torch.bincount(component[inside & on_template], minlength=count)
        union = area + int(crop.sum()) - intersection
        ious[:, t] = intersection.float() / union.float()
    scores, classes = ious.max(dim=1)

    owners = (unique_keys // (h * w)).tolist()
    left, top, right, bottom = x0.tolist(), y0.tolist(), (x1 + 1).tolist(), (y1 + 1).tolist()
    score_list, class_list, color_list = scores.tolist(), classes.tolist(), colors.tolist()
    order = sorted(range(count), key=lambda c: (owners[c], top[c], left[c]))
    for c in order:
        results[owners[c]].append(
            Detection(
                class_name=SHAPES[class_list[c]],
                score=min(max(score_list[c], 0.0), 1.0),
                box=(float(left[c]), float(top[c]), float(right[c]), float(bottom[c])),
                color=COLOR_NAMES[color_list[c]],
            )
        )
    return results
