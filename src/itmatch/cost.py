"""What a cross-attention evaluation will cost, known before it starts.

Cross-attention methods (SCAN, GSMN: per-region and per-word embeddings, `Encoded.emb.ndim == 3`) score every
image-caption pair with its own attention, so an evaluation can take minutes to hours. `estimate_scoring` times
the model's own `similarity` on the first tile of the gallery (a few dozen images against a few hundred captions,
after a tiny warm-up) and extrapolates per pair to the whole matrix (every pair costs about the same; captions are
taken in gallery order, so their lengths are a sample of the gallery's). The peak memory is the resident memory
now, plus the float64 result, plus one chunk of scores as the model returns them and as float64, plus what the
calibration tile added to the peak (the tile's intermediates).

`check_memory` turns an estimate above `/proc/meminfo`'s MemAvailable into one line naming the options that fit.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from itmatch.errors import ItmatchError
from itmatch.models.base import Encoded

CALIBRATION_PAIRS = 16_384  # pairs scored to calibrate (about 0.2 s for SCAN at the F30K sizes on one core)
CHUNK_IMAGES = 1024  # images per call of `similarity` in `inference.similarity_matrix`
PROGRESS_CHUNK = 64  # images per call during a planned cross-attention evaluation (the progress bar's step)


class DryRunFinished(Exception):
    """Raised by the planner of a dry run once the estimate is printed: nothing is scored."""


@dataclass(frozen=True, slots=True)
class ScoringCost:
    """Estimated cost of scoring `pairs` image-caption pairs."""

    pairs: int
    seconds: float
    peak_mb: float
    calibration_pairs: int
    calibration_s: float
    result_mb: float
    tile_mb: float

    def describe(self) -> str:
        return (f"estimated scoring cost: {self.pairs:,} pairs, ~{_duration(self.seconds)}, peak memory "
                f"~{self.peak_mb / 1024:.1f} GB (result {self.result_mb:.0f} MB, tiles {self.tile_mb:.0f} MB; "
                f"calibrated on {self.calibration_pairs:,} pairs in {self.calibration_s:.2f} s)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def is_cross_attention(images: Encoded) -> bool:
    """True when scores come from per-item attention (per-region image embeddings), not one dot product."""
    return images.emb.ndim == 3


def _proc_mb(path: str, key: str) -> float | None:
    """The `key:` line of a /proc file (kB) in MB, or None where it cannot be read."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory of this process now, in MB (0 where /proc is missing)."""
    return _proc_mb("/proc/self/status", "VmRSS") or 0.0


def mem_available_mb() -> float | None:
    """MemAvailable of /proc/meminfo in MB, or None where it cannot be read."""
    return _proc_mb("/proc/meminfo", "MemAvailable")


def _first_captions(texts: Encoded, n: int) -> Encoded:
    if texts.offsets is None:
        return texts.rows(0, n)
    end = int(texts.offsets[n - 1] + texts.lengths[n - 1])
    return Encoded(texts.emb[:end], texts.lengths[:n], texts.offsets[:n])


@torch.inference_mode()
def estimate_scoring(model, images: Encoded, texts: Encoded, *, dtype: torch.dtype,
                     device: torch.device | str = "cpu", pairs: int | None = None,
                     calibration_pairs: int = CALIBRATION_PAIRS) -> ScoringCost:
    """Calibrate `model.similarity` on the first tile and extrapolate to `pairs` (default: all of them).

    `images` and `texts` are the encoded gallery as `inference.similarity_matrix` receives it (`dtype` is the
    scoring dtype); `pairs` is less than n_images x n_captions when only some blocks are scored (5-fold).
    """
    ni, nc = len(images), len(texts)
    total = ni * nc if pairs is None else pairs
    n_img = max(1, min(ni, 64))
    n_cap = max(1, min(nc, calibration_pairs // n_img))
    img = images.rows(0, n_img).to(device, dtype)
    txt = _first_captions(texts, n_cap).to(device, None if texts.offsets is not None else dtype)
    model.similarity(img.rows(0, 1), _first_captions(txt, min(n_cap, 8)))  # warm-up: first-call allocations
    rss_before = rss_mb()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    model.similarity(img, txt)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tile_mb = maxrss_after - rss_before if maxrss_after > maxrss_before else 0.0  # a new peak: the tile's
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunk = min(ni, PROGRESS_CHUNK)
    result_mb = total * 8 / 2**20  # the float64 matrix (or 5-fold blocks) evaluation keeps
    chunk_mb = chunk * nc * (itemsize + 8) / 2**20  # one chunk's scores, as returned and as float64
    calib = n_img * n_cap
    peak_mb = rss_before + result_mb + chunk_mb + tile_mb
    return ScoringCost(pairs=total, seconds=seconds * total / calib, peak_mb=peak_mb, calibration_pairs=calib,
                       calibration_s=seconds, result_mb=result_mb, tile_mb=tile_mb)


def check_memory(cost: ScoringCost, *, available_mb: float | None = None, dtype: torch.dtype,
                 device: str = "cpu") -> None:
    """Raise a one-line ItmatchError when the estimated peak exceeds the memory available, naming what fits."""
    available = mem_available_mb() if available_mb is None else available_mb
    if available is None or cost.peak_mb <= available:
        return
    hints = []
    if cost.tile_mb > 64:
        hints.append(f"--memory-budget {max(16, int(cost.tile_mb / 4))} (smaller tiles)")
    if dtype == torch.float64:
        hints.append("--dtype float32 (half the tile memory)")
    if device == "cpu" and torch.cuda.is_available():
        hints.append("--device cuda")
    if not hints:
        hints.append("--fold5 (scores only the five diagonal blocks) or a machine with more memory")
    raise ItmatchError(f"scoring needs ~{cost.peak_mb / 1024:.1f} GB but {available / 1024:.1f} GB is available; "
                       f"try {' or '.join(hints)}")


def eval_planner(model, *, device: str = "cpu", dry_run: bool = False, report=print):
    """The `before_scoring` hook of `inference.compute_sims` for `itmatch eval`.

    Cross-attention galleries: report the calibrated estimate, refuse (ItmatchError) when it does not fit in the
    memory available, stop with DryRunFinished on a dry run, else score in chunks of PROGRESS_CHUNK images (the
    progress bar's steps; the chunking is the same on and off a terminal, so it never depends on the display).
    """

    def before_scoring(images: Encoded, texts: Encoded, dtype: torch.dtype, pairs: int) -> int | None:
        if not is_cross_attention(images):
            if dry_run:
                report(f"estimated scoring cost: {pairs:,} pairs in one matrix product (no cross-attention)")
                raise DryRunFinished
            return None
        cost = estimate_scoring(model, images, texts, dtype=dtype, device=device, pairs=pairs)
        report(cost.describe())
        check_memory(cost, dtype=dtype, device=device)
        if dry_run:
            raise DryRunFinished
        return PROGRESS_CHUNK

    return before_scoring
