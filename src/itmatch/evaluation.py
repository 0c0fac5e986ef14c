"""The papers' evaluation protocol as pure functions on a similarity matrix.

`sims` is (n_images, n_captions) with captions 5i..5i+4 belonging to image i. Ranks are 0-based and follow the
originals: the descending order is `np.argsort(row)[::-1]` on float64 scores (so ties break exactly as upstream);
image->text takes the best rank among the 5 ground-truth captions; R@K = 100 * mean(rank < K);
medr = floor(median(rank)) + 1; meanr = mean(rank) + 1; rsum = the six recalls summed. COCO 1K = the mean over
five folds of 1000 images of `testall`, with rsum recomputed from the averaged recalls (the originals print a
wrong rsum on that line); COCO 5K and Flickr30K 1K = the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)
_CHUNK = 256  # rows argsorted at once: bounds the int64 index buffer (COCO 5K: 256 x 25000 x 8 B = 51 MB)


def _check(sims: np.ndarray, cpi: int) -> None:
    if sims.ndim != 2 or sims.shape[1] != sims.shape[0] * cpi:
        raise ValueError(f"sims must be (n_images, {cpi} * n_images), got {sims.shape}")


def i2t_ranks(sims: np.ndarray, captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Image->text: (rank of the best ground-truth caption, top-1 caption) per image."""
    _check(sims, captions_per_image)
    n = sims.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    top1 = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        block = sims[start : start + _CHUNK]
        order = np.argsort(block, axis=1)[:, ::-1]
        owner = order // captions_per_image
        hit = owner == np.arange(start, start + len(block))[:, None]
        ranks[start : start + len(block)] = hit.argmax(axis=1)
        top1[start : start + len(block)] = order[:, 0]
    return ranks, top1


def t2i_ranks(sims: np.ndarray, captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Text->image: (rank of the ground-truth image, top-1 image) per caption."""
    _check(sims, captions_per_image)
    n_cap = sims.shape[1]
    ranks = np.empty(n_cap, dtype=np.int64)
    top1 = np.empty(n_cap, dtype=np.int64)
    for start in range(0, n_cap, _CHUNK):
        block = np.ascontiguousarray(sims[:, start : start + _CHUNK].T)  # (chunk, n_images)
        order = np.argsort(block, axis=1)[:, ::-1]
        target = np.arange(start, start + len(block)) // captions_per_image
        ranks[start : start + len(block)] = (order == target[:, None]).argmax(axis=1)
        top1[start : start + len(block)] = order[:, 0]
    return ranks, top1


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K for each K, medr and meanr (1-based), from 0-based ranks."""
    out = {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def recall_curve(ranks: np.ndarray, max_k: int = 50) -> list[float]:
    """R@K for K = 1..max_k (for plots)."""
    return [100.0 * float(np.mean(ranks < k)) for k in range(1, max_k + 1)]


def _rsum(i2t: dict[str, float], t2i: dict[str, float]) -> float:
    return sum(i2t[f"R@{k}"] + t2i[f"R@{k}"] for k in KS)


def evaluate_sims(sims: np.ndarray, *, captions_per_image: int = 5, fold5: bool = False,
                  curves: bool = False) -> dict:
    """Full protocol on one similarity matrix: {"i2t": {...}, "t2i": {...}, "rsum": x[, "folds": [...]]}.

    With `fold5`, the images are split into five consecutive folds (1000 each for COCO `testall`), each fold is
    evaluated against its own captions, and every metric is the mean over the folds; `sims` is then the full
    (n, 5n) matrix or only its five diagonal blocks, (5, n / 5, n) as `inference.compute_fold_sims` gives them.
    `curves` adds R@1..50 per direction (averaged over folds) for plots.
    """
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim == 3:
        if not fold5 or len(sims) != 5:
            raise ValueError(f"a stack of blocks {sims.shape} is the 5-fold protocol's five diagonal blocks")
        return _mean_over_folds(list(sims), captions_per_image, curves)
    if not fold5:
        ri, _ = i2t_ranks(sims, captions_per_image)
        rt, _ = t2i_ranks(sims, captions_per_image)
        i2t, t2i = rank_metrics(ri), rank_metrics(rt)
        out = {"i2t": i2t, "t2i": t2i, "rsum": _rsum(i2t, t2i), "n_images": sims.shape[0]}
        if curves:
            out["curve"] = {"i2t": recall_curve(ri), "t2i": recall_curve(rt)}
        return out
    n = sims.shape[0]
    if n % 5:
        raise ValueError(f"5-fold evaluation needs a multiple of 5 images, got {n}")
    size = n // 5
    cpi = captions_per_image
    blocks = [sims[f * size : (f + 1) * size, f * size * cpi : (f + 1) * size * cpi] for f in range(5)]
    return _mean_over_folds(blocks, captions_per_image, curves)


def _mean_over_folds(blocks: list[np.ndarray], captions_per_image: int, curves: bool) -> dict:
    """Each fold's block evaluated on its own, every metric averaged over the folds."""
    size = blocks[0].shape[0]
    folds = [evaluate_sims(block, captions_per_image=captions_per_image, curves=curves) for block in blocks]
    i2t = {k: float(np.mean([fd["i2t"][k] for fd in folds])) for k in folds[0]["i2t"]}
    t2i = {k: float(np.mean([fd["t2i"][k] for fd in folds])) for k in folds[0]["t2i"]}
    out = {"i2t": i2t, "t2i": t2i, "rsum": _rsum(i2t, t2i), "n_images": size, "folds": folds}
    if curves:
        out["curve"] = {d: np.mean([fd["curve"][d] for fd in folds], axis=0).tolist() for d in ("i2t", "t2i")}
        for fd in folds:
            del fd["curve"]
    return out


def query_ranks(sims: np.ndarray, *, captions_per_image: int = 5, fold5: bool = False) -> dict[str, np.ndarray]:
    """0-based ranks of every query, {"i2t": per image, "t2i": per caption}; with `fold5` each fold's block (the
    full (n, 5n) matrix or the (5, n/5, n) stack) ranks its own queries and the folds are concatenated."""
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim == 3 or fold5:
        if sims.ndim == 2:
            size = sims.shape[0] // 5
            cpi = captions_per_image
            sims = np.stack([sims[f * size : (f + 1) * size, f * size * cpi : (f + 1) * size * cpi] for f in range(5)])
        folds = [query_ranks(block, captions_per_image=captions_per_image) for block in sims]
        return {d: np.concatenate([f[d] for f in folds]) for d in ("i2t", "t2i")}
    return {"i2t": i2t_ranks(sims, captions_per_image)[0], "t2i": t2i_ranks(sims, captions_per_image)[0]}


_BOOT_ELEMENTS = 4_000_000  # resampled indices drawn at once (32 MB of int64)


def bootstrap_ci(ranks: dict[str, np.ndarray], *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 ks: Sequence[int] = KS) -> dict:
    """Bootstrap confidence intervals of R@K and rsum over queries: each resample draws, with replacement, as many
    queries as there are (images for "i2t", captions for "t2i", independently); R@K and rsum are recomputed on it,
    and the interval is the (1 - level) / 2 and (1 + level) / 2 percentiles over the resamples.

    Deterministic: direction number d (in the order of `ranks`) draws from `np.random.default_rng([seed, d])`,
    `rng.integers(0, n, (rows, n))` for consecutive blocks of `rows = max(1, 4e6 // n)` resamples.
    Returns {"i2t": {"R@1": [lo, hi], ...}, "t2i": {...}, "rsum": [lo, hi], "level", "resamples", "seed"}.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci needs resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    rsums = np.zeros(resamples)
    out: dict = {}
    for d, (direction, r) in enumerate(ranks.items()):
        r = np.asarray(r)
        n = len(r)
        rng = np.random.default_rng([seed, d])
        hits = np.stack([r < k for k in ks])  # (len(ks), n)
        recalls = np.empty((len(ks), resamples))
        rows = max(1, _BOOT_ELEMENTS // max(n, 1))
        for start in range(0, resamples, rows):
            idx = rng.integers(0, n, (min(rows, resamples - start), n))
            for j in range(len(ks)):
                recalls[j, start : start + len(idx)] = 100.0 * hits[j][idx].mean(axis=1)
        rsums += recalls.sum(axis=0)
        out[direction] = {f"R@{k}": [float(np.percentile(recalls[j], lo_q)), float(np.percentile(recalls[j], hi_q))]
                          for j, k in enumerate(ks)}
    out["rsum"] = [float(np.percentile(rsums, lo_q)), float(np.percentile(rsums, hi_q))]
    out |= {"level": level, "resamples": resamples, "seed": seed}
    return out


def contrast_accuracy(sims: np.ndarray, pairs: Sequence[tuple[int, int]], captions_per_image: int = 5) -> dict:
    """Pairwise accuracy on contrast pairs (images that differ in one binding or relation); chance is 50 %.

    t2i: a caption of image a scores a above its partner b. i2t: image a scores each of its own captions above
    each caption of b. Both directions are counted for both members of every pair.
    """
    cpi = captions_per_image
    t2i_hits, i2t_hits = [], []
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            own = np.arange(x * cpi, (x + 1) * cpi)
            other = np.arange(y * cpi, (y + 1) * cpi)
            t2i_hits.extend(sims[x, own] > sims[y, own])
            i2t_hits.extend((sims[x, own][:, None] > sims[x, other][None, :]).ravel())
    if not pairs:
        return {}
    return {"pairs": len(pairs), "t2i": 100.0 * float(np.mean(t2i_hits)), "i2t": 100.0 * float(np.mean(i2t_hits))}


def format_table(results: dict, title: str = "", *, ci: bool = False) -> str:
    """A readable recall table (one row per direction, plus rsum); `ci` adds the bootstrap intervals of
    `results["ci"]` (`bootstrap_ci`) under each row."""
    head = f"{'':8s}{'R@1':>8s}{'R@5':>8s}{'R@10':>8s}{'medr':>8s}{'meanr':>9s}"
    lines = [title] if title else []
    lines.append(head)
    for name, label in (("i2t", "i2t"), ("t2i", "t2i")):
        m = results[name]
        lines.append(
            f"{label:8s}{m['R@1']:8.1f}{m['R@5']:8.1f}{m['R@10']:8.1f}{m['medr']:8.1f}{m['meanr']:9.1f}"
        )
        if ci and "ci" in results:
            lo_hi = results["ci"][name]
            lines.append(f"{'':8s}{100 * results['ci']['level']:.0f}% CI " + ", ".join(
                f"{k} {lo_hi[k][0]:.1f}-{lo_hi[k][1]:.1f}" for k in ("R@1", "R@5", "R@10")))
    if ci and "ci" in results:
        c = results["ci"]
        lines.append(f"rsum {results['rsum']:.1f}  ({100 * c['level']:.0f}% bootstrap interval over queries "
                     f"{c['rsum'][0]:.1f}-{c['rsum'][1]:.1f}, {c['resamples']} resamples, seed {c['seed']})")
    else:
        lines.append(f"rsum {results['rsum']:.1f}")
    if "contrast" in results and results["contrast"]:
        c = results["contrast"]
        lines.append(f"contrast pairs ({c['pairs']}): t2i {c['t2i']:.1f}%  i2t {c['i2t']:.1f}%  (chance 50%)")
    return "\n".join(lines)
