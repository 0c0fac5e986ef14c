"""`itmatch encode-images`: a folder of photos to embeddings with a raw-image model (resumable)."""

from __future__ import annotations

import argparse

from itmatch.cli.common import add_model_args, non_negative_int, positive_float, positive_int, progress
from itmatch.errors import ItmatchError


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
    from itmatch.search import weights_sha256

    summary = encode_folder(loaded.model, args.dir, args.out, size=image_size(scale),
                            normalisation=normalisation,
                            model_id=f"weights:{weights_sha256(loaded.model)}", batch_size=args.batch_size,
                            chunk=args.chunk, workers=args.workers, skip_bad=args.skip_bad, device=args.device,
                            progress=progress(args))
    print(f"wrote {summary['images']} embeddings of size {summary['dim']} to {summary['out']}"
          + (f" ({summary['skipped']} unreadable images skipped)" if summary["skipped"] else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `encode-images` command."""
    ei = sub.add_parser("encode-images", help="embed a folder of photos with a raw-image model (resumable)")
    ei.add_argument("dir", help="folder of images (searched recursively)")
    ei.add_argument("--ckpt", required=True, help="checkpoint of a raw-image model (itmatch or VSE-infinity grid)")
    ei.add_argument("--out", required=True, help="output .npz (embeddings, paths, skipped); OUT.parts/ while running")
    ei.add_argument("--batch-size", type=positive_int, default=32)
    ei.add_argument("--chunk", type=positive_int, default=1024, help="images per resumable chunk")
    ei.add_argument("--workers", type=non_negative_int, default=0, help="decoding threads")
    ei.add_argument("--skip-bad", action="store_true", help="skip unreadable images (default: stop with an error)")
    ei.add_argument("--input-scale-factor", type=positive_float,
                    help="image side int(256 * this) (default: the model's)")
    add_model_args(ei)
    ei.set_defaults(run=_cmd_encode_images)
