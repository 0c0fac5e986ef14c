"""Crisscrossed Captions (CxC) evaluation on the COCO 5K test split, as VSE-infinity reports it.

CxC: Parekh et al., "Crisscrossed Captions: Extended Intramodal and Intermodal Semantic Similarity Judgments for
MS-COCO", EACL 2021. Protocol as upstream `lib/evaluation.py:eval_cxc/cxc_inter/cxc_intra` of
github.com/woodfrog/vse_infty @ 29df9d6:

* ids: `testall_ids.txt` (COCO image id per caption; every 5th line gives the image order), `testall_capids.txt`
  (COCO caption id per caption); annotations `cxc_it.json` (`{"i2t": {img: [[cap, ...], ...]}, "t2i": {cap:
  [[img, ...], ...]}}`), `cxc_i2i.json` and `cxc_t2t.json` (`{id: [[id, score], ...]}`);
* T2I / I2T: rank of the best positive whose id is in the test set, in `argsort(row)[::-1]` order; a query
  without such a positive counts as a miss; an unknown query id is an error;
* I2I: image-image dot products with the diagonal set to 0 (not -inf, so the query itself competes), positives
  with score >= 2.5, queries without positives skipped; T2T: the same on captions, positives = the 4 other
  captions of the image plus those with score >= 3.0 (never skipped);
* R@1/5/10 = 100 * share of queries with rank < K.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itmatch.errors import DataError
from itmatch.evaluation import KS

FILES = ("testall_ids.txt", "testall_capids.txt", "cxc_it.json", "cxc_i2i.json", "cxc_t2t.json")
IMAGE_THRESHOLD, TEXT_THRESHOLD = 2.5, 3.0
_CHUNK = 256


@dataclass(frozen=True)
class CxcAnnotations:
    image_ids: list[str]  # one per image, in the order of the test images
    caption_ids: list[str]  # one per caption
    it: Mapping[str, Mapping[str, list]]  # {"i2t": ..., "t2i": ...}
    i2i: Mapping[str, list]
    t2t: Mapping[str, list]


def load_cxc(path: str | os.PathLike) -> CxcAnnotations:
    """Read the five CxC files from `path` or `path/cxc_annots`."""
    root = Path(path)
    if not (root / FILES[0]).is_file() and (root / "cxc_annots" / FILES[0]).is_file():
        root = root / "cxc_annots"
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise DataError(f"CxC annotations in {root}: missing {', '.join(missing)}")
    lines = (root / FILES[0]).read_text(encoding="utf-8").splitlines()
    image_ids = [x.strip() for i, x in enumerate(lines) if i % 5 == 0]  # one id per caption upstream
    caption_ids = [x.strip() for x in (root / FILES[1]).read_text(encoding="utf-8").splitlines()]

    def load(name: str) -> Any:
        try:
            return json.loads((root / name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{root / name}: not valid JSON ({err})") from None

    return CxcAnnotations(image_ids, caption_ids, load(FILES[2]), load(FILES[3]), load(FILES[4]))


def _index(ids: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, x in enumerate(ids):
        out.setdefault(x, i)  # first occurrence, as list.index upstream
    return out


def _best_ranks(rows: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    """For each row, the best 0-based position of its positives in the descending order (inf if none)."""
    order = np.argsort(rows, axis=1)[:, ::-1]
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(rows.shape[1]), order.shape), axis=1)
    return np.array([pos[r, p].min() if p else np.inf for r, p in enumerate(positives)], dtype=np.float64)


def inter_ranks(sims: np.ndarray, query_ids: Sequence[str], data_ids: Sequence[str],
                annot: Mapping[str, list]) -> np.ndarray:
    """Cross-modal ranks; `sims` is (n_queries, n_data), row q scores query_ids[q] against data_ids."""
    where = _index(data_ids)
    positives = []
    for q in query_ids:
        if q not in annot:
            raise DataError(f"CxC: query id {q} has no entry in the annotations")
        positives.append([where[str(item[0])] for item in annot[q] if str(item[0]) in where])
    return np.concatenate([_best_ranks(sims[s : s + _CHUNK], positives[s : s + _CHUNK])
                           for s in range(0, len(query_ids), _CHUNK)])


def intra_ranks(embs: np.ndarray, ids: Sequence[str], annot: Mapping[str, list], *, text: bool) -> np.ndarray:
    """Same-modality ranks on `embs @ embs.T` with a zero diagonal; I2I skips queries without positives."""
    where = _index(ids)
    threshold = TEXT_THRESHOLD if text else IMAGE_THRESHOLD
    positives, queries = [], []
    for q, qid in enumerate(ids):
        if qid not in annot:
            raise DataError(f"CxC: id {qid} has no entry in the {'text' if text else 'image'} annotations")
        try:
            pos = [where[str(item[0])] for item in annot[qid] if item[1] >= threshold]
        except KeyError as err:
            raise DataError(f"CxC: positive {err} of {qid} is not in the test ids") from None
        if text:
            pos = [i for i in range(q // 5 * 5, q // 5 * 5 + 5) if i != q] + pos  # the image's other captions
        elif not pos:
            continue
        queries.append(q)
        positives.append(pos)
    ranks = []
    for s in range(0, len(queries), _CHUNK):
        rows = queries[s : s + _CHUNK]
        block = embs[rows] @ embs.T
        block[np.arange(len(rows)), rows] = 0.0
        ranks.append(_best_ranks(block, positives[s : s + _CHUNK]))
    return np.concatenate(ranks) if ranks else np.zeros(0)


def recalls(ranks: np.ndarray) -> dict[str, float]:
    if not len(ranks):
        raise DataError("CxC: no query has a positive")
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in KS}


def evaluate_cxc(images: np.ndarray, captions: np.ndarray, annots: CxcAnnotations,
                 sims: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """CxC R@1/5/10 for i2t, t2i, i2i, t2t from (N, D) image and (5N, D) caption embeddings (float64 as upstream).

    `sims` (N, 5N) may be passed when already computed (it must equal images @ captions.T).
    """
    if len(images) != len(annots.image_ids) or len(captions) != len(annots.caption_ids):
        raise DataError(
            f"CxC annotations cover {len(annots.image_ids)} images / {len(annots.caption_ids)} captions, the split has "
            f"{len(images)} / {len(captions)}; CxC is defined on the COCO 5K test split (testall)"
        )
    sims = images @ captions.T if sims is None else sims
    return {
        "i2t": recalls(inter_ranks(sims, annots.image_ids, annots.caption_ids, annots.it["i2t"])),
        "t2i": recalls(inter_ranks(sims.T, annots.caption_ids, annots.image_ids, annots.it["t2i"])),
        "i2i": recalls(intra_ranks(images, annots.image_ids, annots.i2i, text=False)),
        "t2t": recalls(intra_ranks(captions, annots.caption_ids, annots.t2t, text=True)),
    }
