"""Captions of the synthetic dataset: a small grammar with synonyms, relations computed from the boxes, counts and
lists (`_Captioner` plans a caption, `_realise` writes it), five different true captions per scene (`_captions`), the
contrast-pair templates whose captions keep the same bag of words on both members, and the dependency pairs of a
caption from the grammar's word classes (`dependency_pairs`, GSMN's sparse graphs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.synthetic.scene import SHAPES, _Obj, _rel_table

_ADJECTIVES = ("size", "colour", "material")  # English adjective order in a noun phrase

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
