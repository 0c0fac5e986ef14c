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
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.lib.format import open_memmap

from itmatch.errors import DataError

__all__ = ["SPLITS_COCO", "SPLITS_F30K", "generate", "render_scene"]

SPLITS_F30K = {"train": 4000, "dev": 500, "test": 1000}
SPLITS_COCO = {"train": 8000, "dev": 1000, "test": 1000, "testall": 5000}

CANVAS_W, CANVAS_H = 480, 320
N_REGIONS = 36
CAPTIONS_PER_IMAGE = 5

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "brown", "grey")
SHAPES = ("cube", "sphere", "cylinder", "cone", "pyramid", "ring")
SIZES = ("small", "large")
MATERIALS = ("metal", "rubber", "wood", "glass")
_VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "material": MATERIALS}
_ATTRS = ("colour", "shape", "size", "material")  # column order of the feature code tables
_ADJECTIVES = ("size", "colour", "material")  # English adjective order in a noun phrase

_VARIANTS = {"f30k": (0, SPLITS_F30K), "coco": (1, SPLITS_COCO)}
_SPLIT_INDEX = {"train": 0, "dev": 1, "test": 2, "testall": 3}
_CONTRAST_SPLITS = frozenset({"test", "testall"})
_ID_STRIDE = 1_000_000
_BLOCK = 5  # contrast splits: images 5b, 5b+1 are a contrast pair, 5b+2..5b+4 single scenes (40 % in pairs)

# Feature model.
_LATENT = 64
_N_BACKGROUND = 16
_POS_FREQS = np.pi * np.array([1.0, 2.0, 4.0, 8.0])
_NOISE = 0.25
_MAX_FOREGROUND = 30  # objects + parts + duplicates; at least 6 background regions remain
_CHUNK_BYTES = 32 << 20  # features are computed into a buffer of this size, then copied to the memmap

# Geometry: box side (pixels) = base(size, scale) * aspect(shape).
_ASPECT = {
    "cube": (1.0, 1.0),
    "sphere": (1.0, 1.0),
    "cylinder": (0.8, 1.15),
    "cone": (0.9, 1.1),
    "pyramid": (1.15, 0.95),
    "ring": (1.2, 0.8),
}

# Grammar: synonyms are chosen once per caption, so a value always reads the same within one caption.
_SYN: dict[str, tuple[str, ...]] = {
    "grey": ("grey", "gray"),
    "cube": ("cube", "block"),
    "sphere": ("sphere", "ball"),
    "ring": ("ring", "torus"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
    "metal": ("metal", "metallic", "shiny"),
    "rubber": ("rubber", "matte"),
    "wood": ("wooden",),
    "objects": ("objects", "things"),
}
_PLURAL = {"torus": "tori"}
_REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "in front of": ("in front of",),
    "behind": ("behind",),
    "next to": ("next to", "beside"),
}
_REL_ITS: dict[str, tuple[str, ...]] = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
    "in front of": ("in front of it",),
    "behind": ("behind it",),
    "next to": ("next to it", "beside it"),
}
_SYN_KEYS = tuple(sorted(_SYN)) + tuple(f"rel:{r}" for r in _REL_PHRASES) + tuple(f"its:{r}" for r in _REL_ITS)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
_REL_PREFIXES = ("", "", "", "there is", "a scene with", "an image of", "a picture of", "a photo of")
_LIST_PREFIXES = ("", "there is", "a scene with", "an image of", "a picture of", "a photo of", "a view of")
_COUNT_KEYS = (("shape",), ("colour", "shape"), ("size", "shape"), ("material", "shape"), ("colour",))

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


@dataclass(frozen=True)
class _NP:
    """Noun phrase plan: an object and which adjectives to show (the shape noun is always shown)."""

    obj: int
    attrs: frozenset[str]


@dataclass(frozen=True)
class _Rel:
    """Relation clause plan "a REL b"; realisation swaps a and b when the scene makes "b REL a" true."""

    a: _NP
    rel: str
    b: _NP
    form: str  # "plain": "a REL b", "is": "a is REL b", "with": "b with a REL-it"


_Items = list[str | _NP | _Rel]  # a caption plan under construction


@dataclass(frozen=True)
class _Plan:
    """A caption before realisation: items are literal words, noun phrases and relation clauses."""

    items: tuple[str | _NP | _Rel, ...]
    syn: Mapping[str, int]
    upper: bool


@dataclass(frozen=True)
class _Nuisance:
    """Non-object detections of one image, relative to its objects, so both members of a pair share them.

    Extra region e is a part (or, if `duplicate`, a jittered re-detection) of object `owner[e]`: its box is
    `rel_box[e]` in units of the owner's box and its feature keeps the attributes where `keep[e]` is true.
    """

    owner: np.ndarray  # (E,) int
    duplicate: np.ndarray  # (E,) bool
    rel_box: np.ndarray  # (E, 4) float: x1, y1, x2, y2 relative to the owner's box
    keep: np.ndarray  # (E, 4) bool, columns in _ATTRS order
    background_code: np.ndarray  # (B,) int
    background_box: np.ndarray  # (B, 4) int, pixels
    noise_seed: int


@dataclass(frozen=True)
class _Image:
    """Everything written for one image."""

    scene: list[_Obj]
    captions: list[str]
    relations: list[list[int | str]]
    nuisance: _Nuisance
    group: int | None
    contrast: str | None


# -------------------------------------------------------------------------------------------------- geometry


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


# -------------------------------------------------------------------------------------------------- captions


def _word(value: str, syn: Mapping[str, int]) -> str:
    options = _SYN.get(value, (value,))
    return options[syn.get(value, 0) % len(options)]


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _np_text(np_: _NP, scene: Sequence[_Obj], syn: Mapping[str, int]) -> str:
    obj = scene[np_.obj]
    words = [_word(getattr(obj, a), syn) for a in _ADJECTIVES if a in np_.attrs]
    words.append(_word(obj.shape, syn))
    return f"{_article(words[0])} {' '.join(words)}"


def _realise(
    plan: _Plan, scene: Sequence[_Obj], rels: Mapping[tuple[int, int], frozenset[str]]
) -> tuple[str, list[list[int | str]]] | None:
    """Caption text and the relation triples it states, or None if a clause holds in neither direction."""
    parts: list[str] = []
    triples: list[list[int | str]] = []
    for item in plan.items:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, _NP):
            parts.append(_np_text(item, scene, plan.syn))
        else:
            a, b = item.a, item.b
            if item.rel not in rels[(a.obj, b.obj)]:
                if item.rel not in rels[(b.obj, a.obj)]:
                    return None
                a, b = b, a
            triples.append([a.obj, item.rel, b.obj])
            if item.form == "with":
                its = _REL_ITS[item.rel]
                phrase = its[plan.syn[f"its:{item.rel}"] % len(its)]
                parts.append(f"{_np_text(b, scene, plan.syn)} with {_np_text(a, scene, plan.syn)} {phrase}")
            else:
                options = _REL_PHRASES[item.rel]
                phrase = options[plan.syn[f"rel:{item.rel}"] % len(options)]
                verb = " is" if item.form == "is" else ""
                parts.append(f"{_np_text(a, scene, plan.syn)}{verb} {phrase} {_np_text(b, scene, plan.syn)}")
    text = " ".join(p for p in parts if p).replace(" ,", ",") + "."
    if plan.upper:
        text = text[0].upper() + text[1:]
    return text, triples


def _conj(parts: Sequence[str | _NP]) -> list[str | _NP]:
    """Join parts as "A", "A and B" or "A, B and C"."""
    items: list[str | _NP] = []
    for k, part in enumerate(parts):
        if k == len(parts) - 1 and k > 0:
            items.append("and")
        elif k > 0:
            items.append(",")
        items.append(part)
    return items


class _Captioner:
    """Draws caption plans for one scene; plans for a contrast pair are drawn on its first member."""

    def __init__(self, scene: Sequence[_Obj], rng: np.random.Generator) -> None:
        self.scene = scene
        self.rng = rng
        self.rels = _rel_table(scene)
        self.syn: dict[str, int] = {}

    def _pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.integers(len(seq))]

    def _matches(self, k: int, obj: int, attrs: frozenset[str]) -> bool:
        a, b = self.scene[k], self.scene[obj]
        return a.shape == b.shape and all(getattr(a, t) == getattr(b, t) for t in attrs)

    def noun_phrase(self, obj: int, forced: frozenset[str] = frozenset()) -> _NP:
        """A random subset of adjectives, extended until it identifies the object in its scene if possible."""
        probs = {"size": 0.35, "colour": 0.65, "material": 0.3}
        attrs = set(forced) | {a for a in _ADJECTIVES if self.rng.random() < probs[a]}
        for extra in [_ADJECTIVES[t] for t in self.rng.permutation(len(_ADJECTIVES))]:
            others = [k for k in range(len(self.scene)) if k != obj and self._matches(k, obj, frozenset(attrs))]
            if not others:
                break
            attrs.add(extra)
        return _NP(obj, frozenset(attrs))

    def _rel(self, a: int, b: int, rel: str, forms: Sequence[str] = ("plain", "is", "with")) -> _Rel:
        return _Rel(self.noun_phrase(a), rel, self.noun_phrase(b), self._pick(forms))

    def _prefixed(self, prefixes: Sequence[str], clause: _Rel) -> _Items:
        """A relation clause as a caption, with an opening such as "there is" unless it has a verb."""
        if clause.form == "is":
            return [clause]
        if clause.form == "with":
            prefixes = [p for p in prefixes if not p.endswith("with")]
        return [self._pick(prefixes), clause]

    def _related_pairs(self, among: Sequence[int] | None = None) -> list[tuple[int, int]]:
        return [p for p, r in self.rels.items() if r and (among is None or p[0] in among or p[1] in among)]

    def _same(self, k: int, obj: int, key: tuple[str, ...]) -> bool:
        return all(getattr(self.scene[k], t) == getattr(self.scene[obj], t) for t in key)

    def _count_phrase(self, obj: int, key: tuple[str, ...]) -> tuple[str, int]:
        """Phrase like "two red cubes" for all objects sharing `obj`'s values of `key` (an exact count)."""
        count = sum(self._same(k, obj, key) for k in range(len(self.scene)))
        o = self.scene[obj]
        words = [_word(getattr(o, a), self.syn) for a in _ADJECTIVES if a in key]
        noun = _word(o.shape, self.syn) if "shape" in key else _word("objects", self.syn)[:-1]
        if count == 1:
            return f"{_article(words[0] if words else noun)} {' '.join([*words, noun])}", count
        return f"{_NUMBERS[count]} {' '.join([*words, _plural(noun)])}", count

    # ---- templates for ordinary scenes; each returns plan items or None when the scene does not allow it

    def t_relation(self) -> _Items | None:
        pairs = self._related_pairs()
        if not pairs:
            return None
        a, b = self._pick(pairs)
        return self._prefixed(_REL_PREFIXES, self._rel(a, b, self._pick(sorted(self.rels[(a, b)]))))

    def t_two_relations(self) -> _Items | None:
        pairs = self._related_pairs()
        first = self._pick(pairs) if pairs else None
        rest = [p for p in pairs if first and not set(p) & set(first)]
        if not rest:
            return None
        second = self._pick(rest)
        form = ("is",) if self.rng.random() < 0.6 else ("plain",)
        clauses = [self._rel(*p, self._pick(sorted(self.rels[p])), forms=form) for p in (first, second)]
        return [clauses[0], "and", clauses[1]]

    def t_list(self) -> _Items | None:
        n = len(self.scene)
        k = int(self.rng.integers(2, min(4, n) + 1))
        objs = self.rng.permutation(n)[:k]
        return [self._pick(_LIST_PREFIXES), *_conj([self.noun_phrase(int(o)) for o in objs])]

    def t_count(self) -> _Items | None:
        n = len(self.scene)
        phrase, count, obj, key = "", 0, 0, _COUNT_KEYS[0]
        for _ in range(5):
            obj, key = int(self.rng.integers(n)), self._pick(_COUNT_KEYS)
            phrase, count = self._count_phrase(obj, key)
            if count > 1:
                break
        items: _Items = [self._pick(("there are" if count > 1 else "there is", "a scene with", ""))]
        items.append(phrase)
        if count == 1 or self.rng.random() < 0.6:
            second = self._disjoint_count(obj, key)
            if second is None:
                return None if count == 1 else items
            items += ["and", second]
        return items

    def _disjoint_count(self, obj: int, key: tuple[str, ...]) -> str | None:
        """A count phrase for objects none of which is counted by (obj, key), if there is one."""
        n = len(self.scene)
        first = {k for k in range(n) if self._same(k, obj, key)}
        for other in self.rng.permutation(n):
            if int(other) in first:
                continue
            for t in self.rng.permutation(len(_COUNT_KEYS)):
                key2 = _COUNT_KEYS[t]
                if not any(self._same(k, int(other), key2) for k in first):
                    return self._count_phrase(int(other), key2)[0]
        return None

    def t_total(self) -> _Items | None:
        n = len(self.scene)
        head = [
            self._pick(("a scene with", "there are", "a group of", "")),
            f"{_NUMBERS[n]} {_word('objects', self.syn)}",
        ]
        if self.rng.random() < 0.8:
            k = int(self.rng.integers(1, 3))
            head += ["including", *_conj([self.noun_phrase(int(o)) for o in self.rng.permutation(n)[:k]])]
        return head

    # ---- templates for contrast pairs: every caption mentions the two objects whose binding/relation differs

    def _pair_nps(self, i: int, j: int, attr: str) -> tuple[_NP, _NP]:
        """Noun phrases for a contrast pair's two objects, both showing `attr` and the same adjective slots.

        Equal slots keep the bag of words (articles included) the same on both members of the pair.
        """
        first, second = self.noun_phrase(i, frozenset({attr})), self.noun_phrase(j, frozenset({attr}))
        attrs = first.attrs | second.attrs
        return _NP(i, attrs), _NP(j, attrs)

    def c_swap_relation(self, i: int, j: int, attr: str) -> _Items | None:
        rels = sorted(self.rels[(i, j)])
        if not rels:
            return None
        np_i, np_j = self._pair_nps(i, j, attr)
        forms = ("plain", "is", "with")
        return self._prefixed(_REL_PREFIXES, _Rel(np_i, self._pick(rels), np_j, self._pick(forms)))

    def c_swap_list(self, i: int, j: int, attr: str) -> _Items | None:
        others = [k for k in range(len(self.scene)) if k not in (i, j)]
        chosen = [others[t] for t in self.rng.permutation(len(others))[: self.rng.integers(0, 3)]]
        nps = [*self._pair_nps(i, j, attr), *(self.noun_phrase(k) for k in chosen)]
        nps = [nps[t] for t in self.rng.permutation(len(nps))]
        return [self._pick(_LIST_PREFIXES), *_conj(nps)]

    def c_swap_two_relations(self, i: int, j: int, attr: str) -> _Items | None:
        form = "is" if self.rng.random() < 0.6 else "plain"
        clauses = []
        for np_obj in self._pair_nps(i, j, attr):
            obj = np_obj.obj
            partners = [p for p in self._related_pairs([obj]) if {i, j} != set(p)]
            if not partners:
                return None
            a, b = self._pick(partners)
            rel = self._pick(sorted(self.rels[(a, b)]))
            if a == obj:
                clauses.append(_Rel(np_obj, rel, self.noun_phrase(b), form))
            else:
                clauses.append(_Rel(self.noun_phrase(a), rel, np_obj, form))
        return [clauses[0], "and", clauses[1]]

    def c_swap_total(self, i: int, j: int, attr: str) -> _Items | None:
        pair = list(self._pair_nps(i, j, attr))
        if self.rng.random() < 0.5:
            pair.reverse()
        head = self._pick(("a scene with", "there are", "a group of", ""))
        return [head, f"{_NUMBERS[len(self.scene)]} {_word('objects', self.syn)}", "including", *_conj(pair)]

    def c_move(self, i: int, j: int) -> _Items | None:
        np_i, np_j = self._pair_nps(i, j, "colour")
        clause = _Rel(np_i, self._pick(("left of", "right of")), np_j, self._pick(("plain", "is", "with")))
        others = [k for k in range(len(self.scene)) if k not in (i, j)]
        style = self.rng.integers(3)
        if style == 0 or not others:
            return self._prefixed(_REL_PREFIXES, clause)
        if style == 1:
            return [
                self._pick(("a scene with", "there is", "an image of")),
                self.noun_phrase(self._pick(others)),
                "and",
                replace(clause, form="plain"),
            ]
        head = self._pick(("a scene with", "a group of", ""))
        return [
            head,
            f"{_NUMBERS[len(self.scene)]} {_word('objects', self.syn)}",
            "including",
            replace(clause, form="plain"),
        ]

    def plan(self, template: Callable[..., _Items | None], *args: Any) -> _Plan | None:
        """Draw this caption's synonyms, then the template's items (None if the scene does not allow it)."""
        self.syn = dict(zip(_SYN_KEYS, (int(v) for v in self.rng.integers(0, 6, len(_SYN_KEYS))), strict=True))
        items = template(*args)
        if items is None:
            return None
        return _Plan(tuple(items), self.syn, bool(self.rng.random() < 0.4))


_TEMPLATES = (
    ("t_relation", 0.3),
    ("t_two_relations", 0.15),
    ("t_list", 0.25),
    ("t_count", 0.15),
    ("t_total", 0.15),
)
# Counting captions say less about the objects: at most one of each kind per image.
_MAX_PER_TEMPLATE = {"t_count": 1, "t_total": 1}
_SWAP_TEMPLATES = (
    ("c_swap_relation", 0.4),
    ("c_swap_list", 0.3),
    ("c_swap_two_relations", 0.15),
    ("c_swap_total", 0.15),
)


def _draw_template(rng: np.random.Generator, table: Sequence[tuple[str, float]]) -> str:
    u = rng.random() * sum(w for _, w in table)
    for name, w in table:
        u -= w
        if u < 0:
            return name
    return table[-1][0]


def _dedup(triples: list[list[int | str]]) -> list[list[int | str]]:
    out: list[list[int | str]] = []
    for t in triples:
        if t not in out:
            out.append(t)
    return out


def _captions(scene: list[_Obj], rng: np.random.Generator) -> tuple[list[str], list[list[int | str]]] | None:
    """Five different true captions of an ordinary scene, or None if the scene is too poor for five."""
    cap = _Captioner(scene, rng)
    texts: list[str] = []
    triples: list[list[int | str]] = []
    used_templates: Counter[str] = Counter()
    for _ in range(60):
        template = _draw_template(rng, _TEMPLATES)
        if used_templates[template] >= _MAX_PER_TEMPLATE.get(template, CAPTIONS_PER_IMAGE):
            continue
        plan = cap.plan(getattr(cap, template))
        if plan is None:
            continue
        realised = _realise(plan, scene, cap.rels)
        if realised is None:
            continue
        text, used = realised
        if text not in texts:
            used_templates[template] += 1
            texts.append(text)
            triples += used
            if len(texts) == CAPTIONS_PER_IMAGE:
                return texts, _dedup(triples)
    return None


# -------------------------------------------------------------------------------------------------- contrast


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


# -------------------------------------------------------------------------------------------------- regions


def _nuisance(rng: np.random.Generator, n_obj: int) -> _Nuisance:
    """Parts, duplicate detections and background regions filling the 36 region slots."""
    duplicate = rng.random(n_obj) < 0.5
    jitter = rng.uniform(-0.1, 0.1, (n_obj, 4)) + np.array([0.0, 0.0, 1.0, 1.0])
    n_parts = rng.integers(1, 4, n_obj)
    total = int(n_parts.sum())
    size = rng.uniform(0.3, 0.7, (total, 2))
    corner = rng.random((total, 2)) * (1 - size)
    parts = np.concatenate([corner, corner + size], axis=1)
    ranks = np.argsort(rng.random((total, 4)), axis=1).argsort(axis=1)  # random order of the 4 attributes
    part_keep = ranks < rng.integers(1, 4, total)[:, None]  # keep a random 1-3 of them
    owner, is_dup, rel_box, keep = [], [], [], []
    first_part = np.concatenate([[0], np.cumsum(n_parts)])
    for k in range(n_obj):  # extras grouped by object: its duplicate first, then its parts
        if duplicate[k]:
            owner.append(k)
            is_dup.append(True)
            rel_box.append(jitter[k])
            keep.append(np.ones(4, dtype=bool))
        for t in range(first_part[k], first_part[k + 1]):
            owner.append(k)
            is_dup.append(False)
            rel_box.append(parts[t])
            keep.append(part_keep[t])
    n_extra = min(len(owner), _MAX_FOREGROUND - n_obj)
    n_bg = N_REGIONS - n_obj - n_extra
    w = rng.integers(40, CANVAS_W + 1, n_bg)
    h = rng.integers(30, CANVAS_H + 1, n_bg)
    x1 = (rng.random(n_bg) * (CANVAS_W - w + 1)).astype(np.int64)
    y1 = (rng.random(n_bg) * (CANVAS_H - h + 1)).astype(np.int64)
    return _Nuisance(
        owner=np.array(owner[:n_extra], dtype=np.int64),
        duplicate=np.array(is_dup[:n_extra], dtype=bool),
        rel_box=np.array(rel_box[:n_extra], dtype=np.float64).reshape(-1, 4),
        keep=np.array(keep[:n_extra], dtype=bool).reshape(-1, 4),
        background_code=rng.integers(_N_BACKGROUND, size=n_bg),
        background_box=np.stack([x1, y1, x1 + w, y1 + h], axis=1),
        noise_seed=int(rng.integers(2**63 - 1)),
    )


def _regions(scene: Sequence[_Obj], nuisance: _Nuisance) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per region: attribute code indices (-1: absent), background code (-1: none), box, noise scale."""
    n_obj, n_extra = len(scene), len(nuisance.owner)
    obj_codes = np.array([[_VALUES[a].index(getattr(o, a)) for a in _ATTRS] for o in scene], dtype=np.int64)
    obj_boxes = np.array([o.box for o in scene], dtype=np.float64)
    owner_box = obj_boxes[nuisance.owner]
    wh = np.tile(owner_box[:, 2:] - owner_box[:, :2], 2)
    extra = np.rint(np.tile(owner_box[:, :2], 2) + nuisance.rel_box * wh)
    extra = np.clip(extra, 0, [CANVAS_W - 1, CANVAS_H - 1, CANVAS_W, CANVAS_H])
    extra[:, 2:] = np.maximum(extra[:, 2:], extra[:, :2] + 1)
    codes = np.full((N_REGIONS, len(_ATTRS)), -1, dtype=np.int64)
    codes[:n_obj] = obj_codes
    codes[n_obj : n_obj + n_extra] = np.where(nuisance.keep, obj_codes[nuisance.owner], -1)
    background = np.full(N_REGIONS, -1, dtype=np.int64)
    background[n_obj + n_extra :] = nuisance.background_code
    boxes = np.concatenate([obj_boxes, extra, nuisance.background_box]).astype(np.float32)
    noise = np.ones(N_REGIONS, dtype=np.float32)
    noise[n_obj : n_obj + n_extra][nuisance.duplicate] = 1.5
    return codes, background, boxes, noise


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Small matrix product without BLAS.

    It is bit-reproducible whatever the thread count and has no thread start-up cost, which dominates for
    these (36 x 32) @ (32 x dim) products.
    """
    return np.einsum("ik,kj->ij", a, b, optimize=False)


class _FeatureModel:
    """Fixed random codes and projection (from the seed only): feature = ReLU(P(sum of codes) + noise)."""

    def __init__(self, seed: int, dim: int) -> None:
        rng = np.random.default_rng([seed, 1000])
        tables = [rng.standard_normal((len(_VALUES[a]) + 1, _LATENT)) for a in _ATTRS]
        tables.append(rng.standard_normal((_N_BACKGROUND + 1, _LATENT)))
        for t in tables:
            t[-1] = 0.0  # index -1: attribute absent from this region
        pos = rng.standard_normal((8 * len(_POS_FREQS), _LATENT)) / math.sqrt(2 * len(_POS_FREQS))
        proj = rng.standard_normal((_LATENT, dim)) / math.sqrt(_LATENT)
        self.tables = [_matmul(t, proj).astype(np.float32) for t in tables]
        self.pos = _matmul(pos, proj).astype(np.float32)
        self.dim = dim

    def __call__(self, codes, background, boxes, noise_scale, noise_seed: int) -> np.ndarray:
        pre = self.tables[-1][background]
        for t, table in enumerate(self.tables[:-1]):
            pre = pre + table[codes[:, t]]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        geo = np.stack(
            [(boxes[:, 0] + w / 2) / CANVAS_W, (boxes[:, 1] + h / 2) / CANVAS_H, w / CANVAS_W, h / CANVAS_H],
            axis=1,
        ).astype(np.float32)
        angles = (geo[:, :, None] * _POS_FREQS.astype(np.float32)).reshape(len(boxes), -1)
        pre = pre + _matmul(np.concatenate([np.sin(angles), np.cos(angles)], axis=1), self.pos)
        noise = np.random.default_rng(noise_seed).standard_normal((N_REGIONS, self.dim), dtype=np.float32)
        return np.maximum(pre + noise * (_NOISE * noise_scale[:, None]), 0).astype(np.float32)


# -------------------------------------------------------------------------------------------------- images


def _single(rng: np.random.Generator) -> _Image:
    while True:
        scene = _sample_scene(rng, int(rng.integers(2, 7)))
        caps = _captions(scene, rng)
        if caps is not None:
            return _Image(scene, caps[0], caps[1], _nuisance(rng, len(scene)), None, None)


def _pair(rng: np.random.Generator, group: int) -> tuple[_Image, _Image]:
    while True:
        made = _contrast_pair(rng)
        if made is not None:
            break
    first, second, kind, (texts1, texts2, triples1, triples2) = made
    nuisance = _nuisance(rng, len(first))
    return (
        _Image(first, texts1, triples1, nuisance, group, kind),
        _Image(second, texts2, triples2, nuisance, group, kind),
    )


def _images(seed: int, variant: int, content_split: str, n: int) -> Iterator[_Image]:
    """The split's images in order; image i depends only on (seed, variant, split, i)."""
    split_index = _SPLIT_INDEX[content_split]
    contrast = content_split in _CONTRAST_SPLITS
    i = 0
    while i < n:
        rng = np.random.default_rng([seed, variant, split_index, i])
        if contrast and i % _BLOCK == 0:
            first, second = _pair(rng, i // _BLOCK)
            if i + 1 < n:
                yield first
                yield second
                i += 2
                continue
            yield replace(first, group=None, contrast=None)  # its partner is cut off by the split size
        else:
            yield _single(rng)
        i += 1


# -------------------------------------------------------------------------------------------------- render


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


# -------------------------------------------------------------------------------------------------- writing


def _scene_record(split: str, index: int, image_id: int, image: _Image) -> dict:
    return {
        "split": split,
        "index": index,
        "id": image_id,
        "objects": [
            {
                "colour": o.colour,
                "shape": o.shape,
                "size": o.size,
                "material": o.material,
                "box": list(o.box),
                "depth": o.depth,
            }
            for o in image.scene
        ],
        "relations": image.relations,
        "captions": image.captions,
        "group": image.group,
        "contrast": image.contrast,
    }


def _write_split(
    out: Path,
    split: str,
    n: int,
    *,
    seed: int,
    variant: int,
    model: _FeatureModel,
    scenes_file: TextIO,
    render: bool,
    bar: Any,
) -> None:
    """Write one split's four files and its scenes.jsonl lines, features chunk by chunk."""
    content_split = "testall" if variant == _VARIANTS["coco"][0] and split == "test" else split
    id_base = (_SPLIT_INDEX[content_split] + 1) * _ID_STRIDE
    ims_path = out / f"{split}_ims.npy"
    created = open_memmap(ims_path, mode="w+", dtype=np.float32, shape=(n, N_REGIONS, model.dim))
    del created  # the file now exists at full size; chunks are written through short-lived mappings
    boxes = open_memmap(out / f"{split}_boxes.npy", mode="w+", dtype=np.float32, shape=(n, N_REGIONS, 4))
    chunk = max(1, _CHUNK_BYTES // (N_REGIONS * model.dim * 4))
    buffer = np.empty((min(chunk, n), N_REGIONS, model.dim), dtype=np.float32)
    with (
        open(out / f"{split}_caps.txt", "w", encoding="utf-8", newline="\n") as caps_file,
        open(out / f"{split}_ids.txt", "w", encoding="utf-8", newline="\n") as ids_file,
    ):
        for index, image in enumerate(_images(seed, variant, content_split, n)):
            codes, background, region_boxes, noise_scale = _regions(image.scene, image.nuisance)
            row = index % chunk
            buffer[row] = model(codes, background, region_boxes, noise_scale, image.nuisance.noise_seed)
            boxes[index] = region_boxes
            if row == len(buffer) - 1 or index == n - 1:
                # unmapping after each chunk keeps the resident set at one chunk for many-GB files
                ims = open_memmap(ims_path, mode="r+")
                ims[index - row : index + 1] = buffer[: row + 1]
                ims.flush()
                del ims
            image_id = id_base + index
            caps_file.write("".join(c + "\n" for c in image.captions))
            ids_file.write(f"{image_id}\n")
            scenes_file.write(json.dumps(_scene_record(split, index, image_id, image)) + "\n")
            if render:
                _render(image.scene, out / "images" / f"{image_id}.png")
            bar.update(1)
    boxes.flush()
    del boxes


_NOUNS = frozenset(
    [w for s in SHAPES for w in _SYN.get(s, (s,))]
    + [_plural(w) for s in SHAPES for w in _SYN.get(s, (s,))]
    + ["objects", "things", "object", "thing", "scene", "image", "picture", "photo", "view", "group"]
)


def dependency_pairs(tokens: Sequence[str]) -> list[list[int]]:
    """Dependency pairs of a synthetic caption from the grammar's word classes, in CoreNLP's layout.

    First [0, root], then [head, dependent] with 1-based token positions. The first noun is the root, every later
    noun depends on the noun before it (relation and list chains), every other token on the next noun (its
    determiner, adjectives, preposition, conjunction or comma), or on the root when no noun follows; the final
    period depends on the root. `tokens` are the caption's tokens (`itmatch.data.tokenize.tokenize`).
    """
    nouns = [i for i, t in enumerate(tokens, start=1) if t in _NOUNS]
    root = nouns[0] if nouns else 1
    pairs = [[0, root]]
    for k, noun in enumerate(nouns[1:]):
        pairs.append([nouns[k], noun])
    following = iter(nouns)
    nxt = next(following, None)
    for i in range(1, len(tokens) + 1):
        while nxt is not None and nxt < i:
            nxt = next(following, None)
        if i == nxt or i == root:
            continue
        pairs.append([root if nxt is None or tokens[i - 1] == "." else nxt, i])
    return pairs


def _write_gsmn_files(root: Path, counts: Mapping[str, int]) -> None:
    """GSMN's files for every split: ims_bbx/ims_size (.npy), caps.json (dependency pairs), precaps_stan.txt.

    Word ids of precaps_stan.txt come from the vocabulary `itmatch data vocab` builds (train + dev captions, words
    seen at least 4 times), so they equal what that vocabulary gives; written only when a train split exists.
    """
    from itmatch.data.tokenize import tokenize
    from itmatch.data.vocab import build_vocab

    captions = {s: (root / f"{s}_caps.txt").read_text(encoding="utf-8").splitlines() for s in counts}
    vocab = None
    if "train" in counts:
        vocab = build_vocab([c for s in ("train", "dev") if s in captions for c in captions[s]], threshold=4)
    for split, n in counts.items():
        np.save(root / f"{split}_ims_bbx.npy", np.load(root / f"{split}_boxes.npy"))
        sizes = np.empty(n, dtype=object)
        for i in range(n):
            sizes[i] = {"image_w": CANVAS_W, "image_h": CANVAS_H}
        np.save(root / f"{split}_ims_size.npy", sizes, allow_pickle=True)
        deps = [dependency_pairs(tokenize(c)) for c in captions[split]]
        (root / f"{split}_caps.json").write_text(json.dumps(deps, separators=(",", ":")) + "\n", encoding="utf-8")
        if vocab is not None:
            with open(root / f"{split}_precaps_stan.txt", "w", encoding="utf-8", newline="\n") as fh:
                fh.writelines(",".join(map(str, vocab.encode(c))) + "\n" for c in captions[split])


def generate(
    out: str | os.PathLike,
    *,
    variant: str = "f30k",
    seed: int = 0,
    dim: int = 256,
    sizes: Mapping[str, int] | None = None,
    render: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Write the dataset to `out` (created if missing) and return {split: n_images}.

    Besides the SCAN layout it writes GSMN's files (`_write_gsmn_files`): boxes and image sizes in the original's
    names, dependency pairs from the grammar (`dependency_pairs`) and pre-tokenised word ids.

    Splits of size 0, or missing from a given `sizes`, are not written. `render` also draws every image to
    `out/images/{id}.png` and writes `out/id_mapping.json`, so that `out` is also a raw-image dataset
    (`data.source = "images"`); `progress` shows a progress bar over images.
    """
    from tqdm import tqdm

    if variant not in _VARIANTS:
        raise DataError(f"unknown synthetic variant {variant!r}; use 'f30k' or 'coco'")
    variant_index, defaults = _VARIANTS[variant]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise DataError(f"synthetic feature dim must be a positive integer, got {dim!r}")
    requested = dict(defaults if sizes is None else sizes)
    unknown = sorted(set(requested) - set(defaults))
    if unknown:
        raise DataError(f"unknown {variant} split(s) {', '.join(unknown)}; known: {', '.join(defaults)}")
    counts: dict[str, int] = {}
    for split in defaults:
        n = requested.get(split, 0)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n < _ID_STRIDE:
            raise DataError(f"size of split {split!r} must be an integer in [0, {_ID_STRIDE}), got {n!r}")
        if n:
            counts[split] = int(n)
    if variant == "coco" and counts.get("test", 0) > counts.get("testall", _ID_STRIDE):
        raise DataError("coco 'test' is the first images of 'testall' and cannot be larger than it")
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if render:
        (root / "images").mkdir(exist_ok=True)
    model = _FeatureModel(int(seed), int(dim))
    with (
        open(root / "scenes.jsonl", "w", encoding="utf-8", newline="\n") as scenes_file,
        tqdm(total=sum(counts.values()), disable=not progress, unit="img", desc="synthetic") as bar,
    ):
        for split, n in counts.items():
            _write_split(
                root,
                split,
                n,
                seed=int(seed),
                variant=variant_index,
                model=model,
                scenes_file=scenes_file,
                render=render,
                bar=bar,
            )
    _write_gsmn_files(root, counts)
    if render:  # the raw-image layout of VSE-infinity: id -> file under images/
        mapping = {i: f"{i}.png" for split in counts for i in (root / f"{split}_ids.txt").read_text().split()}
        (root / "id_mapping.json").write_text(json.dumps(mapping) + "\n", encoding="utf-8")
    return counts
