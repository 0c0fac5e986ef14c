"""Where a number came from: the code, the libraries, the machine, the protocol, the data files and the config.

`provenance(...)` returns a plain JSON-able dict that every results JSON (`itmatch eval --out`, the demo's report,
`scripts/results_table.py`) and every checkpoint carries:

    {"itmatch": "0.1.0", "git": {"commit": "...", "dirty": false} | null, "python": ..., "torch": ..., "numpy": ...,
     "device": "cpu", "dtype": "float32", "protocol": {"split", "n_images", "n_captions", "fold5"},
     "data": {"root": ..., "files": {name: {"size", "sha256"[, "sampled"]}}}, "config": {...}, "created": ...}

The git commit is the one of the source tree itmatch is imported from (null outside a git checkout or without
git); `dirty` says whether tracked files differ from it. The data fingerprint hashes the split's files
(`{split}_*` in the dataset directory, plus the vocabulary); files over `FULL_HASH_BYTES` are hashed on their size
and three 16 MiB samples (first, middle, last) so that fingerprinting a 30 GB COCO feature file stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 256 << 20
SAMPLE_BYTES = 16 << 20


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout holding the itmatch sources; None when there is none."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> tuple[str, bool]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest(), False
        h.update(str(size).encode())
        for start in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
            fh.seek(start)
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest(), True


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"[, "sampled": true]} of one file (cached on its size and modification time)."""
    st = os.stat(path)
    digest, sampled = _file_hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    out: dict[str, Any] = {"size": st.st_size, "sha256": digest}
    if sampled:
        out["sampled"] = True
    return out


def data_fingerprint(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """Fingerprints of a split's files in a dataset directory (`{split}_*` and vocab.json)."""
    root = Path(root)
    files = {}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_file() and (p.name.startswith(f"{split}_") or p.name == "vocab.json"):
                files[p.name] = fingerprint(p)
    return {"root": str(root), "files": files}


def provenance(*, config: Any = None, data_root: str | os.PathLike | None = None, split: str | None = None,
               n_images: int | None = None, n_captions: int | None = None, fold5: bool | None = None,
               device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """The provenance record of a result or a checkpoint (see the module docstring). `config` is a `Config`, its
    dict, or a list of them (an ensemble)."""
    import numpy as np
    import torch

    import itmatch
    from itmatch.config import Config, config_to_dict

    def plain(c: Any) -> Any:
        return config_to_dict(c) if isinstance(c, Config) else c

    return {
        "itmatch": itmatch.__version__,
        "git": git_state(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "device": str(device),
        "dtype": dtype,
        "protocol": {"split": split, "n_images": n_images, "n_captions": n_captions, "fold5": fold5},
        "data": data_fingerprint(data_root, split) if data_root is not None and split else None,
        "config": [plain(c) for c in config] if isinstance(config, list) else plain(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
