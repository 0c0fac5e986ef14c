"""`itmatch index build` and `itmatch search`: FAISS galleries of an embedding model, optional re-ranking."""

from __future__ import annotations

import argparse
import json
import time

from itmatch.cli.common import Parser, add_model_args, non_negative_int, positive_int, progress, refuse_existing
from itmatch.errors import ItmatchError


def _index_spec(args: argparse.Namespace):
    from itmatch.index import IndexSpec

    return IndexSpec(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, train_size=args.train_size, m=args.m,
                     ef_construction=args.ef_construction, ef_search=args.ef_search)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from itmatch.search import build_index

    refuse_existing(Path(args.out) / "meta.json", args.force, "the index in it")
    refuse_existing(Path(args.out) / "index.faiss", args.force, "the index in it")
    started = time.perf_counter()
    index = build_index(args.ckpt, args.data, split=args.split, gallery=args.gallery, spec=_index_spec(args),
                        out=args.out, batch_size=args.batch_size, device=args.device, vocab=args.vocab or "",
                        bert_path=args.bert_path or "", progress=progress(args))
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


def register(sub: argparse._SubParsersAction) -> None:
    """The `index` command group and the `search` command."""
    ix = sub.add_parser("index", help="build a retrieval index of a gallery (FAISS)")
    ixsub = ix.add_subparsers(dest="index_command", required=True, parser_class=Parser)
    ib = ixsub.add_parser("build", help="encode a split's images or captions with an embedding model into an index")
    ib.add_argument("ckpt", help="checkpoint of an embedding model (vsepp, vse_infinity, vsrn, hrem)")
    ib.add_argument("--data", required=True, help="dataset directory")
    ib.add_argument("--split", default="test")
    ib.add_argument("--gallery", choices=("images", "captions"), default="images",
                    help="what to index: images (text -> image search) or captions (image -> text)")
    ib.add_argument("--out", required=True, help="index directory to write (index.faiss + meta.json)")
    ib.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                    help="flat: exact inner product (default); ivf / hnsw: approximate, faster on large galleries")
    ib.add_argument("--nlist", type=positive_int, default=1024, help="ivf: number of k-means lists (about 4 sqrt(N))")
    ib.add_argument("--nprobe", type=positive_int, default=16, help="ivf: lists searched per query (search default)")
    ib.add_argument("--train-size", type=non_negative_int, default=0, help="ivf: k-means sample (0: min(N, 64 nlist))")
    ib.add_argument("--m", type=positive_int, default=32, help="hnsw: links per node")
    ib.add_argument("--ef-construction", type=positive_int, default=40, help="hnsw: candidate list while building")
    ib.add_argument("--ef-search", type=positive_int, default=64, help="hnsw: candidate list while searching")
    ib.add_argument("--batch-size", type=positive_int, default=128)
    ib.add_argument("--force", action="store_true", help="replace an index already in --out")
    add_model_args(ib)
    ib.set_defaults(run=_cmd_index_build)

    se = sub.add_parser("search", help="query an index with text (image index) or an image (caption index)")
    se.add_argument("index", help="index directory written by `itmatch index build`")
    se.add_argument("--text", action="append", help="text query (repeat for several)")
    se.add_argument("--image", help="image id of the dataset (`{split}_ids.txt`, else the row) as the query")
    se.add_argument("--image-features", help=".npy of one image's features (regions x dim), or a batch")
    se.add_argument("--image-boxes", help=".npy of --image-features' region boxes (regions x 4: x1, y1, x2, y2 "
                    "divided by the image's width and height), for a GSMN --rerank")
    se.add_argument("-k", type=positive_int, default=10, help="results per query")
    se.add_argument("--ckpt", help="model checkpoint (default: the one the index was built from; must match)")
    se.add_argument("--rerank", metavar="CKPT",
                    help="two-stage: re-rank the top --candidates with this model (SCAN, GSMN: cross-attention)")
    se.add_argument("--candidates", type=positive_int, default=100, help="stage-one results re-ranked by --rerank")
    se.add_argument("--data", help="dataset directory (default: the index's) for --image and re-ranking images")
    se.add_argument("--split", help="split of --image (default: the index's)")
    se.add_argument("--nprobe", type=positive_int, help="ivf: lists searched (default: as built)")
    se.add_argument("--ef-search", type=positive_int, help="hnsw: candidate list (default: as built)")
    se.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_args(se)
    se.set_defaults(run=_cmd_search)
