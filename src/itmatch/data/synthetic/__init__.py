"""Embedded deterministic synthetic dataset, written in the SCAN "precomp" layout.

It lets a new user run training and evaluation in minutes on a CPU and lets CI exercise every method, through
the same readers as the real Flickr30K / MS-COCO bottom-up-attention features. Each image is a scene of 2-6
objects (colour, shape, size, material, box, depth). Its 36 "detected" regions are the objects, then parts and
duplicate detections of them, then background; a region's feature is a fixed random ReLU network of the sum of
its attribute codes and a sinusoidal code of its box, so features are non-negative and non-linear in the
attributes (a mean-pooled "red cube + blue ball" differs from "blue cube + red ball"). Captions come from a
small grammar with synonyms, relations computed from the boxes, counts and lists. The test splits hold
contrast pairs that differ only in one attribute binding or one left/right relation and whose captions have
identical bags of words, so only models that align words with regions can tell the members apart.

Content is a pure function of (seed, variant, split, image index): every image draws from its own
``numpy.random.default_rng([seed, variant, split, index])``, and the fixed codes and projection come from
``default_rng([seed, 1000])`` for all splits. Hence equal arguments give byte-identical files, resizing one
split leaves the others unchanged, and COCO ``test`` is exactly the first images of ``testall``.

Modules: `scene` (objects, layout, relations), `grammar` (captioner, templates, dependency pairs), `contrast`
(contrast pairs), `features` (feature model, regions), `rendering` (PNG drawing), `writer` (splits, files,
`generate`).
"""

from itmatch.data.synthetic.features import N_REGIONS
from itmatch.data.synthetic.grammar import dependency_pairs
from itmatch.data.synthetic.rendering import render_scene
from itmatch.data.synthetic.scene import CANVAS_H, CANVAS_W, COLOURS, MATERIALS, SHAPES, SIZES
from itmatch.data.synthetic.writer import SPLITS_COCO, SPLITS_F30K, generate, scene_records

__all__ = ["CANVAS_H", "CANVAS_W", "COLOURS", "MATERIALS", "N_REGIONS", "SHAPES", "SIZES", "SPLITS_COCO", "SPLITS_F30K",
           "dependency_pairs", "generate", "render_scene", "scene_records"]
