"""`itmatch data ...`: synthesise, check, convert and import datasets."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from itmatch.cli.common import Parser, non_negative_int, positive_int, progress, refuse_existing
from itmatch.data.vocab import VOCAB_THRESHOLD
from itmatch.errors import DataError


def _cmd_synth(args: argparse.Namespace) -> int:
    from itmatch.data.synthetic import generate
    from itmatch.data.vocab import write_vocab

    sizes = None
    if args.train_images is not None:
        from itmatch.data.synthetic import SPLITS_COCO, SPLITS_F30K

        sizes = dict(SPLITS_COCO if args.variant == "coco" else SPLITS_F30K, train=args.train_images)
    out = Path(args.out)
    written = ("vocab.json", "scenes.jsonl", "train_ims.npy", "train_caps.txt", "precomp")
    existing = [name for name in written if (out / name).exists()]
    if existing and not args.force:
        raise DataError(f"{out} already holds a dataset ({existing[0]}); pass --force to overwrite it, or choose "
                        "another --out")
    started = time.perf_counter()
    counts = generate(args.out, variant=args.variant, seed=args.seed, dim=args.dim, sizes=sizes,
                      render=args.render, progress=progress(args))
    vocab = write_vocab(Path(args.out))
    print(f"wrote {args.variant}-like synthetic dataset to {args.out} in {time.perf_counter() - started:.1f}s: "
          + ", ".join(f"{k} {v} images" for k, v in counts.items()) + f"; vocabulary {vocab} words")
    return 0


def _cmd_vocab(args: argparse.Namespace) -> int:
    from itmatch.data.precomp import resolve_root
    from itmatch.data.vocab import write_vocab

    out = Path(args.out) if args.out else None
    refuse_existing(out or resolve_root(args.dir, "train") / "vocab.json", args.force, "the vocabulary")
    n = write_vocab(Path(args.dir), args.threshold, out)
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

    n = convert_butd(args.tsv, args.ids, args.out, args.split, progress=progress(args))
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
    n = write_dependencies(captions, out, progress=progress(args))
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
                       progress=progress(args))
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


def register(sub: argparse._SubParsersAction) -> None:
    """The `data` command group."""
    d = sub.add_parser("data", help="create, check and convert datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    s = dsub.add_parser("synth", help="write the deterministic synthetic dataset (SCAN precomp layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--variant", choices=("f30k", "coco"), default="f30k")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--dim", type=positive_int, default=256, help="feature size (2048 = the real BUTD shape)")
    s.add_argument("--train-images", type=positive_int, help="number of training images")
    s.add_argument("--render", action="store_true", help="also draw every scene to images/ID.png")
    s.add_argument("--force", action="store_true", help="overwrite a dataset already in --out")
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
    v.add_argument("--threshold", type=positive_int, default=VOCAB_THRESHOLD)
    v.add_argument("--out", help="output path (default DIR/vocab.json)")
    v.add_argument("--force", action="store_true", help="replace an existing vocabulary file")
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
    ir.add_argument("--regions", type=positive_int, help="cut or zero-pad every image to this many boxes")
    ir.add_argument("--force", action="store_true", help="overwrite existing output files")
    ir.set_defaults(run=_cmd_import_regions)
    im = dsub.add_parser("import-manifest", help="CSV/JSON Lines image-caption pairs -> raw-image layout")
    im.add_argument("--manifest", required=True, help=".csv with header image,caption or .jsonl objects")
    im.add_argument("--out", required=True, help="dataset directory to write")
    im.add_argument("--split-ratio", help="TRAIN,DEV,TEST fractions (default 0.8,0.1,0.1)")
    im.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --split-ratio permutation")
    im.add_argument("--split-column", help="column naming each row's split (train, dev, test, testall)")
    im.add_argument("--images", help="image folder the paths are relative to (checks every file exists)")
    im.add_argument("--force", action="store_true", help="overwrite existing output files")
    im.set_defaults(run=_cmd_import_manifest)
