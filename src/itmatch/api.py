"""The Python door: load a model, encode your own images and sentences, score them, evaluate, train.

    import itmatch
    matcher = itmatch.load("runs/demo/model_best.pt")            # itmatch checkpoints and the originals' releases
    images = matcher.encode_images(features)                     # (N, regions, dim) region features
    texts = matcher.encode_texts(["a red cube left of a blue ball", "two green spheres"])
    scores = matcher.similarity(images, texts)                   # (N, 2) numpy, the method's own similarity

    result = itmatch.evaluate(["a.pt", "b.pt"], itmatch.open_dataset("data/f30k_precomp", "test"))
    result.results["rsum"], result.sims                          # the papers' protocol and the (ensembled) matrix

The CLI (`itmatch eval`, `itmatch train`, ...) and the server are thin layers over these functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from itmatch.errors import ConfigError, DataError, ItmatchError
from itmatch.method import MethodSpec
from itmatch.models.base import Encoded, RetrievalModel

Protocol = Literal["all", "fold5"]


@dataclass
class Matcher:
    """A loaded model with its tokenizer: encodes raw sentences and features and scores them."""

    model: RetrievalModel
    config: Any  # itmatch.config.Config
    tokenizer: Any  # `encode(caption) -> ids`, `len()`: the model's vocabulary or BERT wordpieces
    path: str = ""
    device: str = "cpu"
    original_batch_size: int | None = None  # a release's opt.batch_size (GSMN's --box-compat batch)

    @property
    def spec(self) -> MethodSpec:
        from itmatch.registry import method_spec

        return method_spec(self.config.model.name)

    @property
    def name(self) -> str:
        return self.config.model.name

    def tokenize(self, text: str) -> list[int]:
        """Word ids of one sentence, as the model reads them (with its start/end tokens)."""
        return list(self.tokenizer.encode(text))

    @torch.inference_mode()
    def encode_images(self, features: np.ndarray | torch.Tensor, *, batch_size: int = 128,
                      **inputs: Any) -> Encoded:
        """Encode images given as features: (N, regions, dim) region features (or (N, dim) where the method reads
        one vector per image, (N, 3, H, W) pixels for raw-image models). `inputs` are what the method reads besides
        features, one row per image (GSMN: `boxes` (N, regions, 4), x1, y1, x2, y2 divided by the image's size)."""
        feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if feats.ndim < 2:
            raise DataError(f"features of shape {tuple(feats.shape)}: expected (N, regions, dim) or (N, dim)")
        declared = self.spec.inputs(self.config.model)
        missing = [] if declared is None else [k for k in declared.image if k not in inputs]
        if missing:
            raise DataError(f"{self.name} also reads {', '.join(missing)} for every image: pass "
                            f"encode_images(features, {missing[0]}=...)")
        parts = []
        for start in range(0, len(feats), batch_size):
            extra = {k: torch.as_tensor(np.asarray(v[start : start + batch_size], dtype=np.float32)).to(self.device)
                     for k, v in inputs.items()}
            parts.append(self.model.encode_image(feats[start : start + batch_size].to(self.device), **extra).to("cpu"))
        from itmatch.inference import concat_encoded

        return concat_encoded(parts)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 128, **inputs: Any) -> Encoded:
        """Encode sentences, tokenised with the model's own vocabulary or BERT tokenizer. What the method reads
        besides word ids (sparse GSMN: dependency pairs) is derived from the text unless given in `inputs`."""
        from itmatch.inference import encode_captions

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for k, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"text {k} is empty: every sentence needs words")
        declared = self.spec.inputs(self.config.model)
        if declared is not None:
            if declared.pretokenized:
                raise DataError(f"{self.path or self.name}: this model reads caption word ids from its dataset's "
                                "pre-tokenised files, so it cannot encode free text")
            if set(declared.caption) - set(inputs):
                inputs = declared.for_texts(texts) | inputs
        tokens = [self.tokenize(t) for t in texts]
        return encode_captions(self.model, tokens, batch_size=batch_size, device=self.device, inputs=inputs)

    @torch.inference_mode()
    def similarity(self, images: Encoded, texts: Encoded, *, dtype: torch.dtype | None = None) -> np.ndarray:
        """(n_images, n_texts) float64 scores of the method's own similarity (in its evaluation dtype by default)."""
        from itmatch.inference import similarity_matrix

        return similarity_matrix(self.model, images, texts, dtype=dtype, device=self.device)


def load(path: str | os.PathLike, *, device: str = "cpu", vocab: str | None = None, bert_path: str | None = None,
         data: str | os.PathLike | None = None, memory_budget_mb: float | None = None) -> Matcher:
    """Load an itmatch checkpoint or a release of one of the original repositories as a `Matcher`.

    Released word-vocabulary models need their vocabulary (`vocab`, or found next to `data`), released BERT models
    a local BERT directory (`bert_path`: config + tokenizer; the weights come from the checkpoint)."""
    from itmatch.checkpoints.loader import load_model
    from itmatch.data.precomp import resolve_root

    root = resolve_root(data, "test") if data is not None else None
    loaded = load_model(path, device=device, vocab=vocab or "", bert_path=bert_path or "", data_root=root,
                        memory_budget_mb=memory_budget_mb)
    return Matcher(loaded.model, loaded.config, loaded.vocab, loaded.path, device, loaded.original_batch_size)


@dataclass
class Dataset:
    """One split of a dataset in the SCAN or VSE-infinity layout (features or raw images)."""

    root: Path
    split: str
    features: Any  # itmatch.data.precomp.PrecompSplit

    @property
    def captions(self) -> list[str]:
        return self.features.captions

    @property
    def n_images(self) -> int:
        return self.features.n_images

    @property
    def image_ids(self) -> list[Any]:
        """Each distinct image's id (`{split}_ids.txt`, else its feature row), in evaluation order."""
        from itmatch.inference import image_rows

        rows = image_rows(self.features)
        ids = self.features.ids
        return [ids[r] if ids else r for r in rows]

    def image_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Features of the distinct images start..stop-1 (evaluation order), e.g. for `Matcher.encode_images`."""
        from itmatch.inference import image_rows

        rows = image_rows(self.features)[start:stop]
        return np.asarray(self.features.images[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    @property
    def caption_ids(self) -> list[int]:
        """Caption numbers (line numbers of `{split}_caps.txt`, from 0)."""
        return list(range(self.features.n_captions))


def open_dataset(path: str | os.PathLike, split: str = "test") -> Dataset:
    """Open a split of a dataset directory (SCAN layout DIR/{split}_ims.npy, or VSE-infinity DIR/precomp/)."""
    from itmatch.data.precomp import PrecompSplit, resolve_root

    root = resolve_root(path, split)
    return Dataset(root, split, PrecompSplit(root, split))


@dataclass
class Evaluation:
    """The protocol's results (`results`: i2t / t2i recalls, medr, meanr, rsum, ...) and the similarity matrix they
    were computed from (`sims`: (n_images, n_captions), or the five (n/5, n) diagonal blocks with `fold5`)."""

    results: dict[str, Any]
    sims: np.ndarray
    image_ids: list[Any]
    caption_ids: list[int]
    models: list[str] = field(default_factory=list)

    def save_sims(self, path: str | os.PathLike) -> None:
        """Write the matrix with its image and caption ids (`.npz`, atomically), for offline analysis/ensembles."""
        from itmatch.report import write_file

        image_ids = np.asarray([str(i) for i in self.image_ids])
        arrays = {"sims": self.sims, "image_ids": image_ids, "caption_ids": np.asarray(self.caption_ids),
                  "models": np.asarray(self.models), "fold5": np.asarray(self.sims.ndim == 3)}
        write_file(path, lambda fh: np.savez(fh, **arrays))


def _as_matcher(model: str | os.PathLike | Matcher, *, device: str, vocab: str, bert_path: str, root: Path | None,
                memory_budget_mb: float | None) -> Matcher:
    if isinstance(model, Matcher):
        return model
    return load(model, device=device, vocab=vocab or None, bert_path=bert_path or None,
                data=root, memory_budget_mb=memory_budget_mb)


def contrast_pairs(root: Path, split: str) -> list[tuple[int, int]]:
    """Contrast pairs (image rows) of a split, from the synthetic dataset's scenes.jsonl if present."""
    from itmatch.data.synthetic import scene_records

    groups: dict[int, list[int]] = {}
    for scene in scene_records(root, split):
        if scene.get("group") is not None:
            groups.setdefault(int(scene["group"]), []).append(int(scene["index"]))
    return [(m[0], m[1]) for m in groups.values() if len(m) == 2]


def evaluate(models: str | os.PathLike | Matcher | Sequence[str | os.PathLike | Matcher],
             dataset: str | os.PathLike | Dataset | None = None, *, split: str = "test", protocol: Protocol = "all",
             batch_size: int = 128, device: str = "cpu", dtype: str | torch.dtype | None = None,
             options: Mapping[str, Any] | None = None, cxc: str | os.PathLike | None = None,
             vocab: str = "", bert_path: str = "", memory_budget_mb: float | None = None,
             tiles: Mapping[str, Any] | None = None, ci_resamples: int = 0, ci_seed: int = 0,
             planner: Any = None, progress: bool = False) -> Evaluation | None:
    """Evaluate one model or an ensemble (averaged similarity matrices, as the papers) on a dataset split.

    `dataset`: a `Dataset`, a directory (split `split`), or None for the dataset the first model was trained on.
    `protocol`: "all" (Flickr30K 1K, COCO 5K: the whole split) or "fold5" (COCO 1K: the mean over five folds of
    1000 images; only the five diagonal blocks are scored). `options`: evaluation options the methods accept
    (GSMN: `box_compat` "release" / "upstream", `box_compat_batch`). `cxc`: a directory of CxC annotations (one
    embedding model on COCO testall). `tiles` (`tiles_dir`, `tile_images`, `tile_captions`) scores the matrix in
    tiles spread over the torchrun ranks and kept on disk for a resumed run (`itmatch.sharded`); then ranks other
    than 0 return None. `planner(model)` gives a `before_scoring` hook (`itmatch.cost.eval_planner`: the estimated
    time and memory of a cross-attention scoring, refused when it does not fit). `ci_resamples` > 0 adds bootstrap
    95 % intervals over the queries (`results["ci"]`); every result records its provenance (code, versions,
    protocol, data fingerprint, configs)."""
    from itmatch.data.precomp import resolve_root
    from itmatch.evaluation import contrast_accuracy, evaluate_sims
    from itmatch.inference import compute_fold_sims, compute_sims
    from itmatch.registry import list_models, method_spec
    from itmatch.training import open_split

    if protocol not in ("all", "fold5"):
        raise ConfigError(f"protocol must be 'all' or 'fold5', got {protocol!r}")
    fold5 = protocol == "fold5"
    items = [models] if isinstance(models, str | os.PathLike | Matcher) else list(models)
    if not items:
        raise ConfigError("evaluate needs at least one model")
    if cxc and len(items) != 1:
        raise ItmatchError("--cxc evaluates one model (its image-image and text-text rankings need embeddings)")
    if cxc and dtype is not None:
        raise ItmatchError("--cxc scores in float64 as the CxC protocol does; leave out --dtype")
    if isinstance(dataset, Dataset):
        split = dataset.split
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    opts = dict(options or {})
    sims_sum, names, root, cxc_results, first, configs = None, [], None, None, None, []
    for item in items:
        data_dir = dataset.root if isinstance(dataset, Dataset) else dataset
        matcher = _as_matcher(item, device=device, vocab=vocab, bert_path=bert_path,
                              root=resolve_root(data_dir, split) if data_dir else None,
                              memory_budget_mb=memory_budget_mb)
        where = matcher.path or matcher.name
        if not (data_dir or matcher.config.data.path):
            raise ItmatchError(f"{where} does not record its dataset; pass --data DIR")
        root = resolve_root(data_dir or matcher.config.data.path, split)
        split_data = open_split(matcher.config, root, split)
        if fold5 and split_data.n_images % 5:
            raise DataError(f"{root}/{split}: {split_data.n_images} images cannot be cut into 5 folds of the same "
                            "size; the 5-fold protocol is for COCO's testall (5,000 images), leave out --fold5")
        first = first or split_data
        unknown = sorted(k for k in opts if k not in matcher.spec.eval_options)
        if unknown:
            flag = "--" + unknown[0].replace("_", "-")
            takers = ", ".join(sorted(n for n in list_models() if unknown[0] in method_spec(n).eval_options))
            raise ItmatchError(f"{where}: {flag} applies to {takers or 'no'} models only ({matcher.name})")
        method_options: dict[str, Any] = {"fold5": fold5, **opts}
        if opts.get("box_compat") and not opts.get("box_compat_batch"):
            method_options["box_compat_batch"] = matcher.original_batch_size or 64
        if cxc:
            sims, cxc_results = _cxc(matcher, split_data, cxc, batch_size=batch_size, progress=progress)
        elif tiles is not None:  # tiles over the ranks (and on disk): rank 0 gets the matrix, the others None
            from itmatch.sharded import sharded_sims

            sims, _ = sharded_sims(matcher.model, split_data, matcher.tokenizer, fold5=fold5, batch_size=batch_size,
                                   device=device, progress=progress, options=method_options, dtype=torch_dtype,
                                   **tiles)
            if sims is None:
                continue
        else:  # with fold5 only the five diagonal blocks, (5, n/5, n), are scored
            scorer = compute_fold_sims if fold5 else compute_sims
            sims = scorer(matcher.model, split_data, matcher.tokenizer, batch_size=batch_size, device=device,
                          progress=progress, dtype=torch_dtype, options=method_options,
                          before_scoring=planner(matcher.model) if planner else None)
        if not np.isfinite(sims).all():
            raise DataError(f"{where} gives NaN or infinite scores on {root}/{split}; check its weights and the "
                            "features (`itmatch data check`)")
        if sims_sum is not None and sims.shape != sims_sum.shape:
            raise ItmatchError(f"{where}: similarity shape {sims.shape} differs from the first model's")
        sims_sum = sims if sims_sum is None else sims_sum + sims
        names.append(f"{matcher.name}:{where}")
        configs.append(matcher.config)
    if sims_sum is None:  # a torchrun rank other than 0: rank 0 reports
        return None
    assert root is not None
    sims = sims_sum / len(items)  # ensembles average the similarity matrices, as the papers
    results = evaluate_sims(sims, fold5=fold5, curves=True)
    if ci_resamples:
        from itmatch.evaluation import bootstrap_ci, query_ranks

        results["ci"] = bootstrap_ci(query_ranks(sims, fold5=fold5), resamples=ci_resamples, seed=ci_seed)
    results.update({"models": names, "split": split, "data": str(root), "fold5": fold5})
    from itmatch.provenance import provenance

    results["provenance"] = provenance(config=configs, data_root=root, split=split, n_images=first.n_images,
                                       n_captions=first.n_captions, fold5=fold5, device=device,
                                       dtype=str(dtype) if dtype is not None else "the method's default")
    pairs = contrast_pairs(root, split)
    if pairs and not fold5:
        results["contrast"] = contrast_accuracy(sims, pairs)
    if cxc_results is not None:
        results["cxc"] = cxc_results
    dataset_view = Dataset(root, split, first)
    return Evaluation(results, sims, dataset_view.image_ids, dataset_view.caption_ids, names)


def _cxc(matcher: Matcher, split: Any, annots_dir: str | os.PathLike, *, batch_size: int,
         progress: bool) -> tuple[np.ndarray, dict]:
    """(similarity matrix, CxC recalls) of one embedding model on a split (COCO testall)."""
    from itmatch.cxc import evaluate_cxc, load_cxc
    from itmatch.inference import encode_split, similarity_matrix

    annots = load_cxc(str(annots_dir))
    images, texts = encode_split(matcher.model, split, matcher.tokenizer, batch_size=batch_size,
                                 device=matcher.device, progress=progress)
    if images.emb.ndim != 2 or texts.emb.ndim != 2:
        raise ItmatchError("--cxc needs a model with one embedding per image and caption (VSE-style)")
    sims = similarity_matrix(matcher.model, images, texts, device=matcher.device)
    return sims, evaluate_cxc(images.emb.double().numpy(), texts.emb.double().numpy(), annots, sims=sims)


def train(preset_or_config: str | os.PathLike | Any, out: str | os.PathLike, *, overrides: Sequence[str] = (),
          data: str | os.PathLike | None = None, resume: bool = False, progress: bool = False,
          on_epoch: Any = None) -> dict[str, Any]:
    """Train a preset (a name from `itmatch.list_presets()`, a .toml file) or a `Config` into run directory `out`.

    `overrides` are `section.key=value` strings as `itmatch train --set`; `data` sets `data.path`. With `resume`
    the run in `out` continues from its last checkpoint (bit-identically on CPU). `on_epoch(state, info)` is called
    after each epoch's validation (e.g. to print a line). Returns the run's summary."""
    from itmatch.config import Config, config_from_dict, load_preset
    from itmatch.training import CHECKPOINT, fit

    extra = list(overrides) + ([f"data.path={json.dumps(str(data))}"] if data is not None else [])
    if resume:
        from itmatch.checkpoints import native

        cfg = config_from_dict(native.load(Path(out) / CHECKPOINT)["config"])
    elif isinstance(preset_or_config, Config):
        if extra:
            raise ConfigError("overrides apply to presets; change the Config with dataclasses.replace instead")
        cfg = preset_or_config
    else:
        cfg = load_preset(str(preset_or_config), extra)
    return fit(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch)
