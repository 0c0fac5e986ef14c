"""Contrast pairs of the synthetic test splits: two scenes that differ only in one attribute binding (two objects
exchange a colour, material or size) or in one left/right relation (two objects exchange places), with five captions
planned on the first member and realised on both, so that they have identical bags of words.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.synthetic.grammar import _SWAP_TEMPLATES, _Captioner, _dedup, _draw_template, _realise
from itmatch.data.synthetic.scene import _centre, _dims, _Obj, _place, _rel_table, _sample_scene


def _swap_attribute(scene: list[_Obj], i: int, j: int, attr: str) -> list[_Obj]:
    """Scene with `attr` exchanged between objects i and j (boxes resized, same centres, for `size`)."""
    out = list(scene)
    for a, b in ((i, j), (j, i)):
        obj = replace(scene[a], **{attr: getattr(scene[b], attr)})
        if attr == "size":
            obj = replace(obj, box=_place(*_dims(obj.shape, obj.size, obj.scale), *_centre(obj.box)))
        out[a] = obj
    return out


def _binding_ok(first: list[_Obj], second: list[_Obj], pair: tuple[int, int], attr: str) -> bool:
    """Each of the pair's (attr, shape) bindings is unique in its own scene and absent from the other one."""
    keys = [Counter((getattr(o, attr), o.shape) for o in s) for s in (first, second)]
    for s, (own, other) in ((first, (keys[0], keys[1])), (second, (keys[1], keys[0]))):
        for k in pair:
            key = (getattr(s[k], attr), s[k].shape)
            if own[key] != 1 or other[key] != 0:
                return False
    return True


def _move_objects(scene: list[_Obj], i: int, j: int) -> list[_Obj]:
    """Scene with objects i and j exchanging their positions (each keeps its own box size)."""
    out = list(scene)
    ci, cj = _centre(scene[i].box), _centre(scene[j].box)
    for k, c in ((i, cj), (j, ci)):
        o = scene[k]
        out[k] = replace(o, box=_place(o.box[2] - o.box[0], o.box[3] - o.box[1], *c))
    return out


def _pair_captions(
    first: list[_Obj], second: list[_Obj], rng: np.random.Generator, kind: str, i: int, j: int, attr: str
) -> tuple[list[str], list[str], list, list] | None:
    """Five plans drawn on `first`, realised on both members: the same bag of words, different meaning."""
    cap = _Captioner(first, rng)
    rels2 = _rel_table(second)
    texts1: list[str] = []
    texts2: list[str] = []
    triples1: list = []
    triples2: list = []
    for _ in range(60):
        if kind == "attribute_swap":
            plan = cap.plan(getattr(cap, _draw_template(rng, _SWAP_TEMPLATES)), i, j, attr)
        else:
            plan = cap.plan(cap.c_move, i, j)
        if plan is None:
            continue
        one, two = _realise(plan, first, cap.rels), _realise(plan, second, rels2)
        if one is None or two is None or one[0] in texts1 or two[0] in texts2:
            continue
        if kind == "attribute_swap" and one[1] != two[1]:  # a relation changed with a resized object
            continue
        texts1.append(one[0])
        texts2.append(two[0])
        triples1 += one[1]
        triples2 += two[1]
        if len(texts1) == CAPTIONS_PER_IMAGE:
            return texts1, texts2, _dedup(triples1), _dedup(triples2)
    return None


def _contrast_pair(rng: np.random.Generator) -> tuple[list[_Obj], list[_Obj], str, tuple] | None:
    """Two scenes differing in one attribute binding or in one left/right relation, with their captions."""
    kind = "attribute_swap" if rng.random() < 0.5 else "relation"
    scene = _sample_scene(rng, int(rng.integers(2, 7)))
    n = len(scene)
    if kind == "attribute_swap":
        attr = _draw_template(rng, (("colour", 0.5), ("material", 0.25), ("size", 0.25)))
        candidates = [
            (i, j)
            for i in range(n)
            for j in range(i + 1, n)
            if scene[i].shape != scene[j].shape
            and getattr(scene[i], attr) != getattr(scene[j], attr)
            and _binding_ok(scene, _swap_attribute(scene, i, j, attr), (i, j), attr)
        ]
        if not candidates:
            return None
        i, j = candidates[rng.integers(len(candidates))]
        second = _swap_attribute(scene, i, j, attr)
    else:
        attr = "colour"
        keys = Counter((o.colour, o.shape) for o in scene)
        rels = _rel_table(scene)
        candidates = []
        for i in range(n):
            for j in range(i + 1, n):
                horizontal = rels[(i, j)] & {"left of", "right of"}
                wide = abs(_centre(scene[i].box)[0] - _centre(scene[j].box)[0]) >= 60
                unique = keys[(scene[i].colour, scene[i].shape)] == keys[(scene[j].colour, scene[j].shape)] == 1
                if horizontal and wide and unique:
                    moved = _rel_table(_move_objects(scene, i, j))[(i, j)]
                    if {"left of", "right of"} - horizontal <= moved:
                        candidates.append((i, j))
        if not candidates:
            return None
        i, j = candidates[rng.integers(len(candidates))]
        second = _move_objects(scene, i, j)
    caps = _pair_captions(scene, second, rng, kind, i, j, attr)
    if caps is None:
        return None
    return scene, second, kind, caps
