"""Region features of the synthetic dataset: 36 "detected" regions per image (the objects, then parts and duplicate
detections of them, then background), each a fixed random ReLU network of the sum of its attribute codes and a
sinusoidal code of its box (`_FeatureModel`, drawn from the seed only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itmatch.data.synthetic.scene import _ATTRS, _VALUES, CANVAS_H, CANVAS_W, _Obj

N_REGIONS = 36

# Feature model.
_LATENT = 64
_N_BACKGROUND = 16
_POS_FREQS = np.pi * np.array([1.0, 2.0, 4.0, 8.0])
_NOISE = 0.25
_MAX_FOREGROUND = 30  # objects + parts + duplicates; at least 6 background regions remain


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
