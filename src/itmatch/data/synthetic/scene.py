"""Scenes of the synthetic dataset: objects (colour, shape, size, material, box, depth) on a 480 x 320 canvas, their
random layout, and the spatial relations that hold between two of them (from the boxes and the depth order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CANVAS_W, CANVAS_H = 480, 320
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "brown", "grey")
SHAPES = ("cube", "sphere", "cylinder", "cone", "pyramid", "ring")
SIZES = ("small", "large")
MATERIALS = ("metal", "rubber", "wood", "glass")
_VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "material": MATERIALS}
_ATTRS = ("colour", "shape", "size", "material")  # column order of the feature code tables

# Geometry: box side (pixels) = base(size, scale) * aspect(shape).
_ASPECT = {
    "cube": (1.0, 1.0),
    "sphere": (1.0, 1.0),
    "cylinder": (0.8, 1.15),
    "cone": (0.9, 1.1),
    "pyramid": (1.15, 0.95),
    "ring": (1.2, 0.8),
}

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Obj:
    """One scene object; depth 0 is nearest to the viewer."""

    colour: str
    shape: str
    size: str
    material: str
    box: Box
    depth: int
    scale: float


def _dims(shape: str, size: str, scale: float) -> tuple[int, int]:
    base = 44 + 24 * scale if size == "small" else 84 + 40 * scale
    aw, ah = _ASPECT[shape]
    return round(base * aw), round(base * ah)


def _place(w: int, h: int, cx: float, cy: float) -> Box:
    """Box of size w x h centred at (cx, cy), shifted to lie inside the canvas."""
    x1 = min(max(round(cx - w / 2), 0), CANVAS_W - w)
    y1 = min(max(round(cy - h / 2), 0), CANVAS_H - h)
    return (x1, y1, x1 + w, y1 + h)


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _intersection(a: Box, b: Box) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _relations(a: _Obj, b: _Obj) -> frozenset[str]:
    """Spatial relations "a REL b" that hold, from the boxes (image plane) and the depth order."""
    rels = set()
    (ax, ay), (bx, by) = _centre(a.box), _centre(b.box)
    dx, dy = bx - ax, by - ay
    if abs(dx) > 40 and abs(dx) > 1.5 * abs(dy):
        rels.add("left of" if dx > 0 else "right of")
    elif abs(dy) > 40 and abs(dy) > 1.5 * abs(dx):
        rels.add("above" if dy > 0 else "below")
    inter = _intersection(a.box, b.box)
    if inter > 0.15 * min(_area(a.box), _area(b.box)):
        rels.add("in front of" if a.depth < b.depth else "behind")
    gap_x = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
    gap_y = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
    if inter == 0 and max(gap_x, gap_y) < 25:
        rels.add("next to")
    return frozenset(rels)


def _rel_table(scene: Sequence[_Obj]) -> dict[tuple[int, int], frozenset[str]]:
    n = len(scene)
    return {(i, j): _relations(scene[i], scene[j]) for i in range(n) for j in range(n) if i != j}


def _sample_scene(rng: np.random.Generator, n_obj: int) -> list[_Obj]:
    """Random objects at random positions (rejecting heavy overlaps) with a random depth order."""
    depths = rng.permutation(n_obj)
    scene: list[_Obj] = []
    for k in range(n_obj):
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = SIZES[rng.integers(len(SIZES))]
        material = MATERIALS[rng.integers(len(MATERIALS))]
        scale = float(rng.random())
        w, h = _dims(shape, size, scale)
        box = (0, 0, w, h)
        for _ in range(30):
            box = _place(w, h, rng.uniform(w / 2, CANVAS_W - w / 2), rng.uniform(h / 2, CANVAS_H - h / 2))
            if all(_intersection(box, o.box) < 0.4 * min(_area(box), _area(o.box)) for o in scene):
                break
        scene.append(_Obj(colour, shape, size, material, box, int(depths[k]), scale))
    return scene
