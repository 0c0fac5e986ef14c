"""Pictures of synthetic scenes: a flat 2-D drawing of the objects (far ones first) as a PNG, what
`generate(render=True)` writes and `itmatch serve` shows as thumbnails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itmatch.data.synthetic.scene import CANVAS_H, CANVAS_W, _Obj

# Rendering.
_RGB = {
    "red": (200, 40, 40),
    "green": (40, 150, 60),
    "blue": (40, 80, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 60, 170),
    "orange": (240, 140, 30),
    "brown": (130, 85, 45),
    "grey": (128, 128, 128),
}
_BACKGROUND_RGB = (236, 236, 230)


def _render(scene: Sequence[_Obj], path: Path) -> None:
    """Flat 2-D depiction of a scene, far objects first."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CANVAS_W, CANVAS_H), _BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for o in sorted(scene, key=lambda o: -o.depth):
        x1, y1, x2, y2 = o.box
        fill = _RGB[o.colour]
        if o.material == "glass":
            fill = tuple((c + b) // 2 for c, b in zip(fill, _BACKGROUND_RGB, strict=True))
        outline, width = {
            "metal": ((30, 30, 30), 3),
            "rubber": (None, 0),
            "wood": ((100, 60, 20), 2),
            "glass": (tuple(c // 2 for c in _RGB[o.colour]), 1),
        }[o.material]
        cap = max((y2 - y1) // 6, 3)
        if o.shape == "cube":
            draw.rectangle(o.box, fill=fill, outline=outline, width=width)
        elif o.shape == "sphere":
            draw.ellipse(o.box, fill=fill, outline=outline, width=width)
        elif o.shape == "cylinder":
            draw.rectangle((x1, y1 + cap // 2, x2, y2 - cap // 2), fill=fill, outline=outline, width=width)
            draw.ellipse((x1, y2 - cap, x2, y2), fill=fill, outline=outline, width=width)
            draw.ellipse((x1, y1, x2, y1 + cap), fill=fill, outline=outline or (60, 60, 60), width=max(width, 1))
        elif o.shape == "cone":
            draw.ellipse((x1, y2 - cap, x2, y2), fill=fill, outline=outline, width=width)
            draw.polygon(
                [((x1 + x2) // 2, y1), (x1, y2 - cap // 2), (x2, y2 - cap // 2)],
                fill=fill,
                outline=outline,
                width=width,
            )
        elif o.shape == "pyramid":
            apex = ((x1 + x2) // 2, y1)
            draw.polygon([apex, (x1, y2), (x2, y2)], fill=fill, outline=outline or (60, 60, 60), width=max(width, 1))
            draw.line([apex, ((x1 + x2) // 2 + (x2 - x1) // 8, y2)], fill=outline or (60, 60, 60), width=1)
        else:  # ring
            draw.ellipse(o.box, outline=fill, width=max((x2 - x1) // 5, 4))
        if o.material == "metal" and o.shape != "ring":
            hx, hy = x1 + (x2 - x1) // 4, y1 + (y2 - y1) // 3
            draw.ellipse((hx, hy, hx + max((x2 - x1) // 8, 3), hy + max((y2 - y1) // 10, 2)), fill=(250, 250, 250))
    image.save(path, compress_level=1)


def render_scene(objects: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draw a scene from its `scenes.jsonl` record's "objects" to a PNG (what `generate(render=True)` writes)."""
    scene = [_Obj(o["colour"], o["shape"], o["size"], o["material"], tuple(o["box"]), o["depth"], 1.0)
             for o in objects]
    _render(scene, Path(path))
