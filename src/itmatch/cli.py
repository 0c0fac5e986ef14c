"""`itmatch` command line: the only place that parses argv, configures logging and turns errors into one line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from itmatch.errors import DataError, ItmatchError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise ItmatchError(f"{message} (see `{self.prog} --help`)")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# --------------------------------------------------------------------------------------------------- data
def _cmd_synth(args: argparse.Namespace) -> int:
    from itmatch.data.synthetic import generate

    sizes = None
    if args.train_images is not None:
        from itmatch.data.synthetic import SPLITS_COCO, SPLITS_F30K

        sizes = dict(SPLITS_COCO if args.variant == "coco" else SPLITS_F30K, train=args.train_images)
    started = time.perf_counter()
    counts = generate(args.out, variant=args.variant, seed=args.seed, dim=args.dim, sizes=sizes,
                      render=args.render, progress=_progress(args))
    vocab = _write_vocab(Path(args.out), threshold=4)
    print(f"wrote {args.variant}-like synthetic dataset to {args.out} in {time.perf_counter() - started:.1f}s: "
          + ", ".join(f"{k} {v} images" for k, v in counts.items()) + f"; vocabulary {vocab} words")
    return 0


def _write_vocab(root: Path, threshold: int, out: Path | None = None) -> int:
    from itmatch.data.precomp import resolve_root
    from itmatch.data.vocab import save_vocab, vocab_from_captions_files

    root = resolve_root(root, "train")
    files = [root / f"{s}_caps.txt" for s in ("train", "dev") if (root / f"{s}_caps.txt").is_file()]
    vocab = vocab_from_captions_files(files, threshold=threshold)
    save_vocab(vocab, out or root / "vocab.json")
    return len(vocab)


def _cmd_vocab(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    n = _write_vocab(Path(args.dir), args.threshold, out)
    print(f"vocabulary of {n} words (count >= {args.threshold} in train+dev) written to {out or 'vocab.json'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from itmatch.data.check import check_dataset

    lines, problems = check_dataset(args.dir, args.images or "")
    for line in lines:
        print(line)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        raise DataError(f"{args.dir}: {len(problems)} problem(s); first: {problems[0]}")
    print(f"{args.dir}: OK")
    return 0


def _cmd_convert_butd(args: argparse.Namespace) -> int:
    from itmatch.data.butd import convert_butd

    n = convert_butd(args.tsv, args.ids, args.out, args.split, progress=_progress(args))
    print(f"wrote {n} images to {Path(args.out) / f'{args.split}_ims.npy'}")
    return 0


def _cmd_parse(args: argparse.Namespace) -> int:
    from itmatch.data.gsmn_files import write_dependencies
    from itmatch.data.precomp import resolve_root

    root = resolve_root(args.data, args.split)
    captions = root / f"{args.split}_caps.txt"
    out = Path(args.out) if args.out else root / f"{args.split}_caps.json"
    if out.exists() and not args.force:
        raise DataError(f"{out} exists; pass --force to overwrite it")
    started = time.perf_counter()
    n = write_dependencies(captions, out, progress=_progress(args))
    print(f"wrote the dependency pairs of {n} captions to {out} in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_import_karpathy(args: argparse.Namespace) -> int:
    from itmatch.data.karpathy import import_karpathy

    r = import_karpathy(args.json, args.out, images=args.images, id_field=args.id_field, force=args.force)
    print(f"wrote {r.dataset} splits to {Path(args.out) / 'precomp'}: "
          + ", ".join(f"{k} {v} images" for k, v in r.images.items()) + f"; vocabulary {r.vocab_size} words")
    print(f"{r.trimmed} image(s) had more than 5 captions: kept their first 5")
    if r.id_mapping:
        found = Path(args.images).resolve() in {(Path(args.out) / n).resolve() for n in ("flickr30k-images", "images")}
        print(f"wrote {Path(args.out) / 'id_mapping.json'}"
              + ("" if found else f"; train raw-image models with --set data.image_dir={args.images}"))
    return 0


def _cmd_import_regions(args: argparse.Namespace) -> int:
    from itmatch.data.regions import import_regions

    r = import_regions(args.features, args.ids, args.out, args.split, regions=args.regions, force=args.force,
                       progress=_progress(args))
    if r.resumed_at:
        print(f"resumed an interrupted import at image {r.resumed_at}")
    print(f"wrote {r.images} images x {r.regions} regions x {r.dim} to {Path(args.out) / f'{args.split}_ims.npy'}"
          f" (+ _ims_bbx.npy{', _ims_size.npy' if r.sizes else ''})")
    if r.cut or r.padded:
        print(f"{r.cut} image(s) had more than {r.regions} boxes (kept the first {r.regions}), "
              f"{r.padded} fewer (padded with zero features and boxes)")
    if not r.sizes:
        print("no image sizes in .npy extracts: GSMN needs .npz extracts (image_w, image_h)")
    return 0


def _cmd_import_manifest(args: argparse.Namespace) -> int:
    from itmatch.data.manifest import import_manifest, parse_ratios

    if args.split_column and args.split_ratio:
        raise DataError("pass either --split-ratio or --split-column, not both")
    ratios = parse_ratios(args.split_ratio or "0.8,0.1,0.1")
    r = import_manifest(args.manifest, args.out, ratios=ratios, seed=args.seed, split_column=args.split_column,
                        images=args.images, force=args.force)
    how = f"by column {args.split_column!r}" if args.split_column else f"ratio {ratios} seed {args.seed}"
    print(f"wrote {sum(r.images.values())} images from {r.rows} rows to {Path(args.out) / 'precomp'} ({how}): "
          + ", ".join(f"{k} {v}" for k, v in r.images.items()) + f"; vocabulary {r.vocab_size} words")
    print(f"{r.trimmed} image(s) with more than 5 captions kept their first 5; "
          f"{r.dropped} image(s) with fewer than 5 dropped")
    if r.id_mapping and args.images:
        print(f"train raw-image models with --set data.image_dir={args.images}")
    return 0


# --------------------------------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from itmatch.config import load_preset
    from itmatch.evaluation import format_table
    from itmatch.train import fit

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.resume:
        if not args.out:
            raise ItmatchError("--resume needs --out DIR (the run directory to continue)")
        cfg = None
    else:
        if not args.preset:
            raise ItmatchError("train needs --preset NAME (see `itmatch presets`) or --resume with --out DIR")
        cfg = load_preset(args.preset, overrides)
    out = Path(args.out or f"runs/{Path(args.preset).stem}")
    if cfg is None:
        from itmatch.checkpoints import native
        from itmatch.config import config_from_dict
        from itmatch.train import CHECKPOINT

        cfg = config_from_dict(native.load(out / CHECKPOINT)["config"])
    summary = fit(cfg, out, resume=args.resume, progress=_progress(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports and tests
    print(f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['train_seconds']:.0f}s; "
          f"best dev score {summary['best_score']:.1f} at epoch {summary['best_epoch']}; checkpoints in {out}")
    if args.test:
        results = _evaluate([str(out / "model_best.pt")], data=None, split=cfg.data.test_split, fold5=False,
                            progress=_progress(args))
        print(format_table(results, title=f"test ({cfg.data.test_split})"))
    return 0


# --------------------------------------------------------------------------------------------------- eval
def _contrast_pairs(root: Path, split: str) -> list[tuple[int, int]]:
    """Contrast pairs (image rows) of a split, from the synthetic dataset's scenes.jsonl if present."""
    path = root / "scenes.jsonl"
    if not path.is_file():
        return []
    groups: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            scene = json.loads(line)
            if scene.get("split") == split and scene.get("group") is not None:
                groups.setdefault(int(scene["group"]), []).append(int(scene["index"]))
    return [(m[0], m[1]) for m in groups.values() if len(m) == 2]


def _evaluate(ckpts: Sequence[str], *, data: str | None, split: str, fold5: bool, progress: bool,
              batch_size: int = 128, device: str = "cpu", vocab: str = "", bert_path: str = "",
              cxc: str = "", dtype: str | None = None, budget_mb: float | None = None, box_compat: str = "",
              compat_batch_size: int | None = None, planner=None) -> dict:
    import torch

    from itmatch.checkpoints.loader import load_model
    from itmatch.data.precomp import resolve_root
    from itmatch.evaluation import contrast_accuracy, evaluate_sims
    from itmatch.inference import compute_fold_sims, compute_sims
    from itmatch.registry import list_models, method_spec
    from itmatch.train import open_split

    if cxc and len(ckpts) != 1:
        raise ItmatchError("--cxc evaluates one model (its image-image and text-text rankings need embeddings)")
    sims_sum, names, root, cxc_results = None, [], None, None
    for path in ckpts:
        loaded = load_model(path, device=device, vocab=vocab, bert_path=bert_path,
                            data_root=resolve_root(data, split) if data else None, memory_budget_mb=budget_mb)
        spec = method_spec(loaded.config.model.name)
        if not (data or loaded.config.data.path):
            raise ItmatchError(f"{path} does not record its dataset; pass --data DIR")
        root = resolve_root(data or loaded.config.data.path, split)
        split_data = open_split(loaded.config, root, split)
        if box_compat and "box_compat" not in spec.eval_options:
            takers = ", ".join(sorted(n for n in list_models() if "box_compat" in method_spec(n).eval_options))
            raise ItmatchError(f"{path}: --box-compat applies to {takers} models only ({loaded.config.model.name})")
        if cxc:
            sims, cxc_results = _cxc(loaded.model, split_data, loaded.vocab, cxc, batch_size=batch_size,
                                     device=device, progress=progress)
        else:  # with --fold5 only the five diagonal blocks, (5, n/5, n), are scored
            options: dict = {"fold5": fold5}
            if box_compat:
                options |= {"box_compat": box_compat,
                            "box_compat_batch": compat_batch_size or loaded.original_batch_size or 64}
            scorer = compute_fold_sims if fold5 else compute_sims
            sims = scorer(loaded.model, split_data, loaded.vocab, batch_size=batch_size, device=device,
                          progress=progress, dtype=getattr(torch, dtype) if dtype else None, options=options,
                          before_scoring=planner(loaded.model) if planner else None)
        if sims_sum is not None and sims.shape != sims_sum.shape:
            raise ItmatchError(f"{path}: similarity shape {sims.shape} differs from the first model's")
        sims_sum = sims if sims_sum is None else sims_sum + sims
        names.append(f"{loaded.config.model.name}:{path}")
    sims = sims_sum / len(ckpts)  # ensembles average the similarity matrices, as the papers
    results = evaluate_sims(sims, fold5=fold5, curves=True)
    results.update({"models": names, "split": split, "data": str(root), "fold5": fold5})
    pairs = _contrast_pairs(root, split)
    if pairs and not fold5:
        results["contrast"] = contrast_accuracy(sims, pairs)
    if cxc_results is not None:
        results["cxc"] = cxc_results
    return results


def _cxc(model, split, tokenizer, annots_dir: str, *, batch_size: int, device: str, progress: bool):
    """(similarity matrix, CxC recalls) of one model on a split (COCO testall)."""
    from itmatch.cxc import evaluate_cxc, load_cxc
    from itmatch.inference import encode_split, similarity_matrix

    annots = load_cxc(annots_dir)
    images, texts = encode_split(model, split, tokenizer, batch_size=batch_size, device=device, progress=progress)
    if images.emb.ndim != 2 or texts.emb.ndim != 2:
        raise ItmatchError("--cxc needs a model with one embedding per image and caption (VSE-style)")
    sims = similarity_matrix(model, images, texts, device=device)
    return sims, evaluate_cxc(images.emb.double().numpy(), texts.emb.double().numpy(), annots, sims=sims)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    from itmatch.cost import DryRunFinished, eval_planner
    from itmatch.evaluation import format_table
    from itmatch.report import plot_recall_curves, write_json

    def planner(model):  # cross-attention: estimated time and memory before scoring (issue 22)
        return eval_planner(model, device=args.device, dry_run=args.dry_run, report=lambda m: print(m, flush=True))

    try:
        results = _evaluate(args.ckpt, data=args.data, split=args.split, fold5=args.fold5, progress=_progress(args),
                            batch_size=args.batch_size, device=args.device, vocab=args.vocab or "",
                            bert_path=args.bert_path or "", cxc=args.cxc or "", dtype=args.dtype,
                            budget_mb=args.memory_budget, box_compat=args.box_compat,
                            compat_batch_size=args.box_compat_batch, planner=planner)
    except DryRunFinished:
        print("dry run: nothing scored")
        return 0
    protocol = "5-fold 1K" if args.fold5 else f"{results['n_images']} images"
    print(format_table(results, title=f"{args.split} ({protocol}), {len(args.ckpt)} model(s)"))
    if "cxc" in results:
        print("CxC " + "  ".join(f"{d} " + "/".join(f"{v:.1f}" for v in m.values())
                                 for d, m in results["cxc"].items()) + "  (R@1/R@5/R@10)")
    if args.out:
        write_json(results, args.out)
        print(f"results written to {args.out}")
    if args.plot:
        plot_recall_curves({"model" if len(args.ckpt) == 1 else "ensemble": results["curve"]}, args.plot)
        print(f"recall curves written to {args.plot}")
    return 0



# --------------------------------------------------------------------------------------------------- search
def _index_spec(args: argparse.Namespace):
    from itmatch.index import IndexSpec

    return IndexSpec(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, train_size=args.train_size, m=args.m,
                     ef_construction=args.ef_construction, ef_search=args.ef_search)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from itmatch.search import build_index

    started = time.perf_counter()
    index = build_index(args.ckpt, args.data, split=args.split, gallery=args.gallery, spec=_index_spec(args),
                        out=args.out, batch_size=args.batch_size, device=args.device, vocab=args.vocab or "",
                        bert_path=args.bert_path or "", progress=_progress(args))
    print(f"indexed {len(index)} {args.gallery} ({index.dim}-d, {index.meta['model']['name']}, {args.kind}) "
          f"from {args.data} [{args.split}] into {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from itmatch.search import Searcher

    queries = sum(x is not None and x != [] for x in (args.text, args.image, args.image_features))
    if queries != 1:
        raise ItmatchError("search needs exactly one of --text TEXT (repeatable), --image ID, --image-features FILE")
    if args.image_boxes and not args.image_features:
        raise ItmatchError("--image-boxes gives the boxes of --image-features (a dataset --image brings its own)")
    searcher = Searcher.open(args.index, ckpt=args.ckpt, rerank=args.rerank, candidates=args.candidates,
                             data=args.data, device=args.device, vocab=args.vocab or "", bert_path=args.bert_path or "",
                             nprobe=args.nprobe, ef_search=args.ef_search)
    if args.text:
        labels, results = [repr(t) for t in args.text], searcher.search_text(args.text, k=args.k)
    else:
        searcher.require_gallery("captions")
        if args.image is not None:
            feats = searcher.image_features(args.image, data=args.data, split=args.split)
            inputs = searcher.image_inputs(args.image, data=args.data, split=args.split)  # GSMN: its boxes
            labels = [f"image {args.image}"]
        else:
            import numpy as np

            inputs = {}
            for name, path in (("features", args.image_features), ("boxes", args.image_boxes)):
                if not path:
                    continue
                try:
                    inputs[name] = np.load(path, allow_pickle=False)
                except (OSError, ValueError) as err:
                    raise ItmatchError(f"{path}: not a readable .npy array ({err})") from None
            feats = inputs.pop("features")
            labels = [args.image_features]
        results = searcher.search_image(feats, k=args.k, **inputs)
        labels = labels if len(results) == 1 else [f"{labels[0]}[{i}]" for i in range(len(results))]
    if args.json:
        import dataclasses

        print(json.dumps([{"query": q, "hits": [dataclasses.asdict(h) for h in hits]}
                          for q, hits in zip(labels, results, strict=True)], indent=2))
        return 0
    meta = searcher.index.meta
    how = f"{meta['model']['name']}, {searcher.index.spec.kind} index"
    if searcher.reranker is not None:
        how += f", re-ranked by {searcher.reranker.config.model.name} from the top {searcher.candidates}"
    for label, hits in zip(labels, results, strict=True):
        print(f"{label} -> top {len(hits)} of {len(searcher.index)} {searcher.modality} ({how})")
        if searcher.modality == "images":
            print(f"{'rank':>4}  {'score':>8}  image id")
            for h in hits:
                print(f"{h.rank:>4}  {h.score:8.4f}  {h.id}")
        else:
            print(f"{'rank':>4}  {'score':>8}  {'caption':>7}  {'image':>6}  text")
            for h in hits:
                print(f"{h.rank:>4}  {h.score:8.4f}  {h.id:>7}  {h.image_id!s:>6}  {h.text}")
    return 0


# --------------------------------------------------------------------------------------------------- encode
def _cmd_encode_images(args: argparse.Namespace) -> int:
    from itmatch.checkpoints.loader import load_model
    from itmatch.data.images import image_size
    from itmatch.encode import encode_folder
    from itmatch.registry import method_spec

    loaded = load_model(args.ckpt, device=args.device, vocab=args.vocab or "", bert_path=args.bert_path or "")
    normalisation = method_spec(loaded.config.model.name).pixels(loaded.config.model)
    if normalisation is None or not loaded.model.is_embedding_model():
        raise ItmatchError(f"{args.ckpt}: encode-images needs a raw-image embedding model (VSE-infinity grid or "
                           f"VSE++ with a CNN, model.backbone set); this is {loaded.config.model.name} on features")
    scale = args.input_scale_factor or loaded.config.data.input_scale_factor
    ckpt = Path(args.ckpt).resolve()
    summary = encode_folder(loaded.model, args.dir, args.out, size=image_size(scale),
                            normalisation=normalisation,
                            model_id=f"{ckpt}:{ckpt.stat().st_size}", batch_size=args.batch_size,
                            chunk=args.chunk, workers=args.workers, skip_bad=args.skip_bad, device=args.device,
                            progress=_progress(args))
    print(f"wrote {summary['images']} embeddings of size {summary['dim']} to {summary['out']}"
          + (f" ({summary['skipped']} unreadable images skipped)" if summary["skipped"] else ""))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from itmatch.serve import RetrievalService, ServeLimits, serve

    limits = ServeLimits(max_query_chars=args.max_query_chars, max_k=args.max_k,
                         max_upload_bytes=args.max_upload_mb << 20, max_running=args.max_running,
                         max_waiting=args.max_waiting)
    service = RetrievalService.open(args.index, rerank=args.rerank, candidates=args.candidates, data=args.data,
                                    device=args.device, limits=limits, vocab=args.vocab or "",
                                    bert_path=args.bert_path or "")
    print(f"serving {', '.join(args.index)} on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops",
          flush=True)
    serve(service, host=args.host, port=args.port)
    return 0


# --------------------------------------------------------------------------------------------------- misc
def _cmd_presets(args: argparse.Namespace) -> int:
    from itmatch.config import _preset_dir, list_presets

    for name in list_presets():
        first = (_preset_dir() / f"{name}.toml").read_text(encoding="utf-8").splitlines()[0]
        print(f"{name:32s} {first.lstrip('# ').strip()}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Synthesise the dataset, train VSE++ for a few minutes, evaluate on test, write the report."""
    from itmatch.config import load_preset
    from itmatch.data.synthetic import generate
    from itmatch.evaluation import format_table
    from itmatch.report import plot_recall_curves, write_json
    from itmatch.train import BEST, fit

    out, data = Path(args.out), Path(args.data)
    progress = _progress(args)
    if not (data / "train_ims.npy").is_file():
        print(f"[1/3] synthesising the F30K-like dataset in {data} ...", flush=True)
        generate(data, variant="f30k", seed=0, progress=progress, render=False)
        _write_vocab(data, threshold=4)
    else:
        print(f"[1/3] using the synthetic dataset in {data}", flush=True)
    cfg = load_preset("vsepp_synth", [f"data.path={json.dumps(str(data))}", *(args.set or [])])
    print(f"[2/3] training VSE++ (preset vsepp_synth, {cfg.train.epochs} epochs) into {out} ...", flush=True)
    if (out / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(out)
    summary = fit(cfg, out, progress=progress)
    print(f"      {summary['steps']} steps in {summary['train_seconds']:.0f}s, best dev rsum "
          f"{summary['best_score']:.1f} (epoch {summary['best_epoch']})", flush=True)
    print("[3/3] evaluating on the test split ...", flush=True)
    results = _evaluate([str(out / BEST)], data=str(data), split="test", fold5=False, progress=progress)
    results["train_seconds"] = summary["train_seconds"]
    print(format_table(results, title="VSE++ on the synthetic F30K-like test split (1000 images, 5000 captions)"))
    write_json(results, out / "report.json")
    plot_recall_curves({"VSE++": results["curve"]}, out / "recall.png", title="VSE++, synthetic test split")
    print(f"report: {out / 'report.json'}, {out / 'recall.png'}; TensorBoard logs: {out / 'tb'}")
    print("search the test split in a browser (http://127.0.0.1:8000/):")
    for line in serve_commands(out / BEST, data, out):
        print(f"  {line}")
    if args.raw:
        _demo_raw(data, out / "raw", args)
    return 0


def _demo_raw(data: Path, out: Path, args: argparse.Namespace) -> None:
    """Extended demo: render the scenes and train VSE-infinity's grid variant on the pixels, from scratch."""
    from itmatch.config import load_preset
    from itmatch.data.synthetic import generate
    from itmatch.evaluation import format_table
    from itmatch.report import write_json
    from itmatch.train import BEST, fit

    progress = _progress(args)
    if not (data / "id_mapping.json").is_file():
        print(f"[raw 1/3] rendering the scenes to {data / 'images'} (the feature files stay the same) ...", flush=True)
        generate(data, variant="f30k", seed=0, progress=progress, render=True)
    cfg = load_preset("vse_infinity_synth_grid", [f"data.path={json.dumps(str(data))}", *(args.set or [])])
    print(f"[raw 2/3] training VSE-infinity grid (tiny ResNet from scratch, preset vse_infinity_synth_grid, "
          f"{cfg.train.epochs} epochs) into {out} ...", flush=True)
    if (out / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(out)
    summary = fit(cfg, out, progress=progress)
    print("[raw 3/3] evaluating on the test split ...", flush=True)
    results = _evaluate([str(out / BEST)], data=str(data), split="test", fold5=False, progress=progress)
    results["train_seconds"] = summary["train_seconds"]
    results.pop("curve", None)
    print(format_table(results, title="VSE-infinity grid on the rendered test scenes (1000 images, 5000 captions)"))
    write_json(results, out / "report.json")


def serve_commands(ckpt: Path, data: Path, out: Path, itmatch: str = "itmatch") -> list[str]:
    """The commands that index a model's test split (images and captions) and serve them (`itmatch serve`)."""
    images, captions = out / "index_images", out / "index_captions"
    return [f"{itmatch} index build {ckpt} --data {data} --gallery images --out {images}",
            f"{itmatch} index build {ckpt} --data {data} --gallery captions --out {captions}",
            f"{itmatch} serve --index {images} --index {captions} --port 8000"]


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="itmatch", description="Image-text matching: train, evaluate and compare six methods.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model from a preset")
    t.add_argument("--preset", help="preset name (see `itmatch presets`) or a .toml file")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a preset value")
    t.add_argument("--data", help="dataset directory (same as --set data.path=DIR)")
    t.add_argument("--out", help="run directory (default runs/PRESET)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--test", action="store_true", help="evaluate the best model on the test split afterwards")
    t.set_defaults(run=_cmd_train)

    e = sub.add_parser("eval", help="evaluate one checkpoint, or an ensemble of several (averaged similarities)")
    e.add_argument("ckpt", nargs="+", help="checkpoint file(s)")
    e.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    e.add_argument("--split", default="test", help="split to evaluate: test (F30K), testall (COCO), dev")
    e.add_argument("--fold5", action="store_true", help="COCO 1K protocol: mean over 5 folds of 1000 images")
    e.add_argument("--out", help="write the results as JSON")
    e.add_argument("--plot", help="write recall@K curves as PNG")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", default="cpu")
    e.add_argument("--vocab", help="vocabulary JSON of an original checkpoint (default: found next to --data)")
    e.add_argument("--bert-path", help="BERT directory (config + vocab.txt) of an original BERT checkpoint")
    e.add_argument("--cxc", metavar="DIR", help="also report CxC recalls (COCO testall; DIR holds cxc_annots files)")
    e.add_argument("--dtype", choices=("float64", "float32", "bfloat16"), default=None,
                   help="scoring dtype (default: the original's: float64 numpy for most, float32 for GSMN); "
                        "float32 is faster")
    e.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (off: exact float32)")
    e.add_argument("--dry-run", action="store_true",
                   help="encode, print the estimated scoring time and peak memory, and exit without scoring")
    e.add_argument("--memory-budget", type=float, metavar="MB",
                   help="memory for cross-attention intermediates per tile (changes speed, never scores)")
    e.add_argument("--box-compat", nargs="?", const="release", default="", choices=("release", "upstream"),
                   help="GSMN: score with the original's box geometry (cumulative in-place division, row aliasing) "
                        "to reproduce its numbers for its released checkpoints: 'release' (bare --box-compat) with "
                        "the code they were released with (x / height, y / width), 'upstream' with today's data.py")
    e.add_argument("--box-compat-batch", type=int, default=None, metavar="N",
                   help="the original's eval batch size (default: the checkpoint's opt.batch_size, else 64; the "
                        "releases: 64 for F30K, 32 for COCO)")
    e.set_defaults(run=_cmd_eval)

    d = sub.add_parser("data", help="create, check and convert datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    s = dsub.add_parser("synth", help="write the deterministic synthetic dataset (SCAN precomp layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--variant", choices=("f30k", "coco"), default="f30k")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dim", type=int, default=256, help="feature size (2048 = the real BUTD shape)")
    s.add_argument("--train-images", type=int, help="number of training images")
    s.add_argument("--render", action="store_true", help="also draw every scene to images/ID.png")
    s.set_defaults(run=_cmd_synth)
    c = dsub.add_parser("check", help="validate a dataset fully (shapes, dtypes, counts, encoding, NaN/inf)")
    c.add_argument("dir")
    c.add_argument("--images", help="raw-image datasets: the image folder (default DIR/flickr30k-images or DIR/images)")
    c.set_defaults(run=_cmd_check)
    b = dsub.add_parser("convert-butd", help="bottom-up-attention TSV -> {split}_ims.npy (streamed)")
    b.add_argument("--tsv", nargs="+", required=True, help="TSV file(s)")
    b.add_argument("--ids", required=True, help="image id list defining the output order")
    b.add_argument("--out", required=True)
    b.add_argument("--split", required=True)
    b.set_defaults(run=_cmd_convert_butd)
    v = dsub.add_parser("vocab", help="build the vocabulary JSON from train+dev captions")
    v.add_argument("dir")
    v.add_argument("--threshold", type=int, default=4)
    v.add_argument("--out", help="output path (default DIR/vocab.json)")
    v.set_defaults(run=_cmd_vocab)
    pa = dsub.add_parser("parse", help="GSMN sparse: dependency-parse {split}_caps.txt into {split}_caps.json (spaCy)")
    pa.add_argument("--data", required=True, help="dataset directory")
    pa.add_argument("--split", required=True)
    pa.add_argument("--out", help="output path (default DIR/{split}_caps.json)")
    pa.add_argument("--force", action="store_true", help="overwrite an existing output file")
    pa.set_defaults(run=_cmd_parse)
    ik = dsub.add_parser("import-karpathy", help="Karpathy dataset_*.json -> captions, ids, vocab (+ id_mapping.json)")
    ik.add_argument("--json", required=True, help="dataset_flickr30k.json, dataset_coco.json or dataset_flickr8k.json")
    ik.add_argument("--out", required=True, help="dataset directory to write (DIR/precomp/..., DIR/id_mapping.json)")
    ik.add_argument("--images", help="image folder the file names are relative to (writes id_mapping.json)")
    ik.add_argument("--id-field", choices=("auto", "imgid", "cocoid", "stem"), default="auto",
                    help="image ids: auto = cocoid for COCO, imgid for Flickr (as VSE-infinity's id_mapping.json)")
    ik.add_argument("--force", action="store_true", help="overwrite existing output files")
    ik.set_defaults(run=_cmd_import_karpathy)
    ir = dsub.add_parser("import-regions", help="per-image .npz/.npy region features -> {split}_ims.npy (resumable)")
    ir.add_argument("--features", required=True, help="folder of KEY.npz (x, bbox, image_w, image_h) or KEY.npy")
    ir.add_argument("--ids", required=True, help="the split's {split}_ids.txt (defines the row order)")
    ir.add_argument("--out", required=True, help="directory to write {split}_ims.npy, _ims_bbx.npy, _ims_size.npy")
    ir.add_argument("--split", required=True)
    ir.add_argument("--regions", type=int, help="cut or zero-pad every image to this many boxes (adaptive extracts)")
    ir.add_argument("--force", action="store_true", help="overwrite existing output files")
    ir.set_defaults(run=_cmd_import_regions)
    im = dsub.add_parser("import-manifest", help="CSV/JSON Lines image-caption pairs -> raw-image layout")
    im.add_argument("--manifest", required=True, help=".csv with header image,caption or .jsonl objects")
    im.add_argument("--out", required=True, help="dataset directory to write")
    im.add_argument("--split-ratio", help="TRAIN,DEV,TEST fractions (default 0.8,0.1,0.1)")
    im.add_argument("--seed", type=int, default=0, help="seed of the --split-ratio permutation")
    im.add_argument("--split-column", help="column naming each row's split (train, dev, test, testall)")
    im.add_argument("--images", help="image folder the paths are relative to (checks every file exists)")
    im.add_argument("--force", action="store_true", help="overwrite existing output files")
    im.set_defaults(run=_cmd_import_manifest)

    ix = sub.add_parser("index", help="build a retrieval index of a gallery (FAISS)")
    ixsub = ix.add_subparsers(dest="index_command", required=True, parser_class=_Parser)
    ib = ixsub.add_parser("build", help="encode a split's images or captions with an embedding model into an index")
    ib.add_argument("ckpt", help="checkpoint of an embedding model (vsepp, vse_infinity, vsrn, hrem)")
    ib.add_argument("--data", required=True, help="dataset directory")
    ib.add_argument("--split", default="test")
    ib.add_argument("--gallery", choices=("images", "captions"), default="images",
                    help="what to index: images (text -> image search) or captions (image -> text)")
    ib.add_argument("--out", required=True, help="index directory to write (index.faiss + meta.json)")
    ib.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                    help="flat: exact inner product (default); ivf / hnsw: approximate, faster on large galleries")
    ib.add_argument("--nlist", type=int, default=1024, help="ivf: number of k-means lists (about 4 sqrt(N))")
    ib.add_argument("--nprobe", type=int, default=16, help="ivf: lists searched per query (default at search time)")
    ib.add_argument("--train-size", type=int, default=0, help="ivf: k-means sample (default min(N, 64 nlist))")
    ib.add_argument("--m", type=int, default=32, help="hnsw: links per node")
    ib.add_argument("--ef-construction", type=int, default=40, help="hnsw: candidate list while building")
    ib.add_argument("--ef-search", type=int, default=64, help="hnsw: candidate list while searching")
    ib.add_argument("--batch-size", type=int, default=128)
    ib.add_argument("--device", default="cpu")
    ib.add_argument("--vocab", help="vocabulary JSON of an original checkpoint (default: found next to --data)")
    ib.add_argument("--bert-path", help="BERT directory of an original BERT checkpoint")
    ib.set_defaults(run=_cmd_index_build)

    se = sub.add_parser("search", help="query an index with text (image index) or an image (caption index)")
    se.add_argument("index", help="index directory written by `itmatch index build`")
    se.add_argument("--text", action="append", help="text query (repeat for several)")
    se.add_argument("--image", help="image id of the dataset (`{split}_ids.txt`, else the row) as the query")
    se.add_argument("--image-features", help=".npy of one image's features (regions x dim), or a batch")
    se.add_argument("--image-boxes", help=".npy of --image-features' region boxes (regions x 4: x1, y1, x2, y2 "
                    "divided by the image's width and height), for a GSMN --rerank")
    se.add_argument("-k", type=int, default=10, help="results per query")
    se.add_argument("--ckpt", help="model checkpoint (default: the one the index was built from; must match)")
    se.add_argument("--rerank", metavar="CKPT",
                    help="two-stage: re-rank the top --candidates with this model (SCAN, GSMN: cross-attention)")
    se.add_argument("--candidates", type=int, default=100, help="stage-one results re-ranked by --rerank")
    se.add_argument("--data", help="dataset directory (default: the index's) for --image and re-ranking images")
    se.add_argument("--split", help="split of --image (default: the index's)")
    se.add_argument("--nprobe", type=int, help="ivf: lists searched (default: as built)")
    se.add_argument("--ef-search", type=int, help="hnsw: candidate list (default: as built)")
    se.add_argument("--json", action="store_true", help="print the results as JSON")
    se.add_argument("--device", default="cpu")
    se.add_argument("--vocab", help="vocabulary JSON of an original checkpoint")
    se.add_argument("--bert-path", help="BERT directory of an original BERT checkpoint")
    se.set_defaults(run=_cmd_search)

    ei = sub.add_parser("encode-images", help="embed a folder of photos with a raw-image model (resumable)")
    ei.add_argument("dir", help="folder of images (searched recursively)")
    ei.add_argument("--ckpt", required=True, help="checkpoint of a raw-image model (itmatch or VSE-infinity grid)")
    ei.add_argument("--out", required=True, help="output .npz (embeddings, paths, skipped); OUT.parts/ while running")
    ei.add_argument("--batch-size", type=int, default=32)
    ei.add_argument("--chunk", type=int, default=1024, help="images per resumable chunk")
    ei.add_argument("--workers", type=int, default=0, help="decoding threads")
    ei.add_argument("--skip-bad", action="store_true", help="skip unreadable images (default: stop with an error)")
    ei.add_argument("--input-scale-factor", type=float, help="image side int(256 * this) (default: the model's)")
    ei.add_argument("--device", default="cpu")
    ei.add_argument("--vocab", help="vocabulary JSON of an original word-vocabulary checkpoint")
    ei.add_argument("--bert-path", help="BERT directory of an original BERT checkpoint")
    ei.set_defaults(run=_cmd_encode_images)
    sv = sub.add_parser("serve", help="retrieval web page and JSON API over one or two indexes (FastAPI)")
    sv.add_argument("--index", action="append", required=True,
                    help="index directory; give one of images (text queries) and/or one of captions (image queries)")
    sv.add_argument("--rerank", metavar="CKPT",
                    help="re-rank the top --candidates of every query with this model (SCAN: attention maps)")
    sv.add_argument("--candidates", type=int, default=50, help="stage-one results re-ranked by --rerank")
    sv.add_argument("--data", help="dataset directory (default: the one the indexes were built from)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-query-chars", type=int, default=500)
    sv.add_argument("--max-k", type=int, default=100)
    sv.add_argument("--max-upload-mb", type=int, default=4, help="largest uploaded .npy of region features")
    sv.add_argument("--max-running", type=int, default=4, help="searches computed at once")
    sv.add_argument("--max-waiting", type=int, default=64, help="searches queued before answering 503")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--vocab", help="vocabulary JSON of an original checkpoint")
    sv.add_argument("--bert-path", help="BERT directory of an original BERT checkpoint")
    sv.set_defaults(run=_cmd_serve)

    pr = sub.add_parser("presets", help="list the packaged presets")
    pr.set_defaults(run=_cmd_presets)

    dm = sub.add_parser("demo", help="synthesise data, train VSE++, evaluate and report (a few minutes)")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--data", default="data/synth_f30k")
    dm.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    dm.add_argument("--raw", action="store_true",
                    help="extended mode: also render the scenes and train a raw-image model on them (~10 min more)")
    dm.set_defaults(run=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # BERT models are read from local directories only
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        return args.run(args)
    except ItmatchError as err:
        print(f"itmatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("itmatch: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"itmatch: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
