"""`itmatch serve`: the retrieval web page and JSON API over one or two indexes."""

from __future__ import annotations

import argparse

from itmatch.cli.common import add_model_args, non_negative_int, port, positive_float, positive_int


def _cmd_serve(args: argparse.Namespace) -> int:
    from itmatch.serve import RetrievalService, ServeLimits, serve

    limits = ServeLimits(max_query_chars=args.max_query_chars, max_k=args.max_k,
                         max_upload_bytes=args.max_upload_mb << 20, max_running=args.max_running,
                         max_waiting=args.max_waiting, header_timeout_s=args.header_timeout)
    service = RetrievalService.open(args.index, rerank=args.rerank, candidates=args.candidates, data=args.data,
                                    device=args.device, limits=limits, vocab=args.vocab or "",
                                    bert_path=args.bert_path or "")
    print(f"serving {', '.join(args.index)} on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops",
          flush=True)
    serve(service, host=args.host, port=args.port, allowed_hosts=set(args.allowed_host or []) or None)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `serve` command."""
    sv = sub.add_parser("serve", help="retrieval web page and JSON API over one or two indexes (FastAPI)")
    sv.add_argument("--index", action="append", required=True,
                    help="index directory; give one of images (text queries) and/or one of captions (image queries)")
    sv.add_argument("--rerank", metavar="CKPT",
                    help="re-rank the top --candidates of every query with this model (SCAN: attention maps)")
    sv.add_argument("--candidates", type=positive_int, default=50, help="stage-one results re-ranked by --rerank")
    sv.add_argument("--data", help="dataset directory (default: the one the indexes were built from)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=port, default=8000)
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="also answer requests naming this Host (repeatable; on loopback binds only localhost, "
                         "127.0.0.1 and [::1] are answered otherwise, against DNS rebinding)")
    sv.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="S",
                    help="seconds a client may take to send its request head before it is answered 408")
    sv.add_argument("--max-query-chars", type=positive_int, default=500)
    sv.add_argument("--max-k", type=positive_int, default=100)
    sv.add_argument("--max-upload-mb", type=positive_int, default=4, help="largest uploaded .npy of region features")
    sv.add_argument("--max-running", type=positive_int, default=4, help="searches computed at once")
    sv.add_argument("--max-waiting", type=non_negative_int, default=64, help="searches queued before answering 503")
    add_model_args(sv)
    sv.set_defaults(run=_cmd_serve)
