"""Every bad input gets one clear line and loses nothing: a table of bad or edge inputs over every command.

Each case runs `itmatch ...` in-process and asserts exit code 2, exactly one `itmatch: error:` line on stderr (with
the expected words, where given), no traceback, and that every file of the shared world (dataset, run, indexes) and
of the case's own files is byte-identical afterwards. The HTTP endpoints have their own table
(`tests/test_serve_bad_inputs.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.cli import main


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # {data}, {run}, {ckpt}, {index}, {caps_index}, {tmp}, {case} are filled in
    match: str = ""  # words the one error line must contain
    setup: Callable[[Path, dict], None] | None = None  # writes the case's own files under {case}
    code: int = 2
    tags: tuple[str, ...] = field(default=())


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small dataset, a trained VSE++ (tiny) and its image and caption indexes, built through the CLI."""
    from itmatch.data.synthetic import generate

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    generate(data, variant="f30k", seed=2, dim=16, sizes={"train": 40, "dev": 10, "test": 10})
    assert main(["-q", "data", "vocab", str(data)]) == 0
    run = root / "run"
    assert main(["-q", "train", "--preset", "vsepp_synth", "--data", str(data), "--out", str(run),
                 "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "train.epochs=1",
                 "--set", "data.batch_size=20"]) == 0
    ckpt = run / "model_best.pt"
    index, caps_index = root / "index", root / "caps_index"
    assert main(["-q", "index", "build", str(ckpt), "--data", str(data), "--out", str(index)]) == 0
    assert main(["-q", "index", "build", str(ckpt), "--data", str(data), "--gallery", "captions",
                 "--out", str(caps_index)]) == 0
    (root / "out.json").write_text("{}\n", encoding="utf-8")  # a user's file that must survive
    return {"root": root, "data": data, "run": run, "ckpt": ckpt, "index": index, "caps_index": caps_index}


# ------------------------------------------------------------------------------------------------ case setups
def _copy_data(case: Path, world: dict) -> Path:
    target = case / "data"
    shutil.copytree(world["data"], target)
    return target


def _nan_features(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    feats = np.load(data / "test_ims.npy")
    feats[3, 2, 1] = np.nan
    np.save(data / "test_ims.npy", feats)


def _inf_train_features(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    feats = np.load(data / "train_ims.npy")
    feats[:] = np.inf
    np.save(data / "train_ims.npy", feats)


def _other_dim_dev(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    feats = np.load(data / "dev_ims.npy")
    np.save(data / "dev_ims.npy", np.concatenate([feats, feats], axis=-1))


def _huge_caption(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    lines = (data / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    lines[7] = "a " * 300_000
    (data / "test_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _empty_caption(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    lines = (data / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    lines[4] = "   "
    (data / "test_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _missing_caption(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    lines = (data / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    (data / "test_caps.txt").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")


def _latin1_captions(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    text = (data / "test_caps.txt").read_text(encoding="utf-8")
    (data / "test_caps.txt").write_bytes(text.replace("a ", "\xe9 ", 1).encode("latin-1"))


def _no_vocab(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    (data / "vocab.json").unlink()


def _seven_images(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    np.save(data / "test_ims.npy", np.load(data / "test_ims.npy")[:7])
    lines = (data / "test_caps.txt").read_text(encoding="utf-8").splitlines()[:35]
    (data / "test_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = (data / "test_ids.txt").read_text(encoding="utf-8").split()[:7]
    (data / "test_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")


def _truncated_features(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    raw = (data / "test_ims.npy").read_bytes()
    (data / "test_ims.npy").write_bytes(raw[: len(raw) // 2])


def _int_features(case: Path, world: dict) -> None:
    data = _copy_data(case, world)
    np.save(data / "test_ims.npy", np.load(data / "test_ims.npy").astype(np.int64))


def _corrupt_ckpt(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    (case / "model.pt").write_bytes(world["ckpt"].read_bytes()[:5000])


def _text_ckpt(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    (case / "model.pt").write_text("not a checkpoint\n", encoding="utf-8")


def _nan_ckpt(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(world["ckpt"], weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = ckpt["model"][key] * float("nan")
    torch.save(ckpt, case / "model.pt")


def _foreign_ckpt(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": torch.zeros(3)}, case / "model.pt")


def _scan_release(opt_changes: dict) -> Callable[[Path, dict], None]:
    def write(case: Path, world: dict) -> None:
        case.mkdir(parents=True, exist_ok=True)
        vocab = json.loads((world["data"] / "vocab.json").read_text(encoding="utf-8"))
        n_words, dim, embed = len(vocab["word2idx"]), 16, 8
        options = {"cross_attn": "t2i", "lambda_softmax": 9.0, "lambda_lse": 6.0, "agg_func": "Mean",
                   "raw_feature_norm": "clipped_l2norm", "num_layers": 1, "no_imgnorm": False, "no_txtnorm": False}
        opt = argparse.Namespace(**(options | opt_changes))
        gru = torch.nn.GRU(8, embed, batch_first=True, bidirectional=True)
        image = {"fc.weight": torch.randn(embed, dim), "fc.bias": torch.zeros(embed)}
        text = {"embed.weight": torch.randn(n_words, 8), **{f"rnn.{k}": v for k, v in gru.state_dict().items()}}
        torch.save({"model": [image, text], "opt": opt, "epoch": 1}, case / "scan.pth.tar")
    return write


def _binary_tsv(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    (case / "f.tsv").write_bytes(bytes(range(256)) * 40)
    (case / "ids.txt").write_text("1\n2\n", encoding="utf-8")


def _permuted_ids(case: Path, world: dict) -> None:
    shutil.copytree(world["index"], case / "index")
    meta = json.loads((case / "index" / "meta.json").read_text(encoding="utf-8"))
    meta["ids"] = meta["ids"][::-1]
    (case / "index" / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")


def _device_index(case: Path, world: dict) -> None:
    shutil.copytree(world["index"], case / "index")
    (case / "index" / "index.faiss").unlink()
    (case / "index" / "index.faiss").symlink_to("/dev/zero")


def _features_file(values: np.ndarray) -> Callable[[Path, dict], None]:
    def write(case: Path, world: dict) -> None:
        case.mkdir(parents=True, exist_ok=True)
        np.save(case / "q.npy", values)
    return write


def _existing(name: str) -> Callable[[Path, dict], None]:
    def write(case: Path, world: dict) -> None:
        case.mkdir(parents=True, exist_ok=True)
        (case / name).write_text("mine\n", encoding="utf-8")
    return write


def _broken_plugin(case: Path, world: dict) -> None:
    case.mkdir(parents=True, exist_ok=True)
    (case / "plugin.py").write_text("import nonexistent_module_xyz\n", encoding="utf-8")


def _run_dir(case: Path, world: dict) -> None:
    shutil.copytree(world["run"], case / "run")


# ------------------------------------------------------------------------------------------------ the table
TRAIN = ("-q", "train", "--preset", "vsepp_synth", "--data", "{data}", "--out", "{case}/run",
         "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "train.epochs=1")
EVAL = ("-q", "eval", "{ckpt}", "--data", "{data}")
SEARCH = ("-q", "search", "{index}")
SERVE = ("-q", "serve", "--index", "{index}")
ENCODE = ("-q", "encode-images", "{data}", "--ckpt", "{ckpt}", "--out", "{case}/e.npz")
BUILD = ("-q", "index", "build", "{ckpt}", "--data", "{data}", "--out", "{case}/ix")

CASES: list[Case] = []


def add(name: str, *argv: str, match: str = "", setup=None, tags: tuple[str, ...] = ()) -> None:
    CASES.append(Case(name, tuple(argv), match, setup, tags=tags))


# Config values: range, type, finiteness (each key with bad values).
for key, values in {
    "data.batch_size": ["0", "-5", "2.5", "x"], "data.workers": ["-1"], "data.train_images": ["-3"],
    "train.epochs": ["0", "-1"], "train.lr": ["nan", "inf", "0", "-1e-3", "'x'"], "train.lr_update": ["-2"],
    "train.margin": ["-0.1", "nan"], "train.grad_clip": ["nan"], "train.log_every": ["0"],
    "train.val_every": ["-1"], "train.save_every": ["-4"], "train.max_steps": ["-1"],
    "train.region_drop": ["1.0", "-0.1"], "train.word_noise": ["1.5"], "train.amp": ["'fp8'"],
    "train.lr_milestones": ["[-1]"], "model.embed_dim": ["0", "-16"], "model.word_dim": ["0"],
    "model.num_layers": ["0"], "train.max_violation": ["1"], "model.image_dim": ["-1"],
}.items():
    for value in values:
        add(f"train {key}={value}", *TRAIN, "--set", f"{key}={value}", match=key.split(".")[1], tags=("config",))
add("train unknown key", *TRAIN, "--set", "train.lr_step=3", match="unknown key", tags=("config",))
add("train unknown section", *TRAIN, "--set", "optim.lr=3", match="unknown section", tags=("config",))
add("train bad override", *TRAIN, "--set", "lr=3", match="section.key=value", tags=("config",))
add("train unknown preset", "-q", "train", "--preset", "nope", "--data", "{data}", match="unknown preset")
add("train device cuda", *TRAIN, "--set", "train.device='cuda'", match="cuda", tags=("device",))
add("train device bogus", *TRAIN, "--set", "train.device='gpu0'", match="not a device", tags=("device",))
add("train missing data", "-q", "train", "--preset", "vsepp_synth", "--data", "{case}/none", "--out", "{case}/r",
    match="not found")
add("train no preset", "-q", "train", "--out", "{case}/r", match="--preset")
add("train resume without out", "-q", "train", "--resume", match="--out")
add("train resume empty dir", "-q", "train", "--resume", "--out", "{case}", match="checkpoint",
    setup=_existing("notes.txt"))
add("train over an existing run", *TRAIN[:-8], "--out", "{case}/run", match="already holds a run",
    setup=_run_dir, tags=("lost",))
add("train inf features", "-q", "train", "--preset", "vsepp_synth", "--data", "{case}/data", "--out", "{case}/r",
    "--set", "model.embed_dim=16", "--set", "model.word_dim=8", match="nan", setup=_inf_train_features,
    tags=("training",))
add("train dev of another dim", "-q", "train", "--preset", "vsepp_synth", "--data", "{case}/data", "--out",
    "{case}/r", "--set", "model.embed_dim=16", "--set", "model.word_dim=8", match="same regions and dimension",
    setup=_other_dim_dev, tags=("data",))
add("train no vocabulary", "-q", "train", "--preset", "vsepp_synth", "--data", "{case}/data", "--out", "{case}/r",
    match="vocabulary", setup=_no_vocab)
add("train unknown plugin", "--plugin", "{case}/missing.py", *TRAIN, match="plugin not found")
add("train broken plugin", "--plugin", "{case}/plugin.py", *TRAIN, match="failed to load", setup=_broken_plugin)

# eval
for flag, value in [("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "x"), ("--memory-budget", "0"),
                    ("--memory-budget", "nan"), ("--box-compat-batch", "0"), ("--tile-images", "0"),
                    ("--tile-captions", "-1"), ("--dtype", "float16"), ("--box-compat", "sideways")]:
    add(f"eval {flag} {value}", *EVAL, flag, value, match=flag.lstrip("-").split("-")[0], tags=("numbers",))
add("eval missing checkpoint", "-q", "eval", "{case}/none.pt", "--data", "{data}", match="not found")
add("eval directory as checkpoint", "-q", "eval", "{data}", "--data", "{data}", match="not found")
add("eval truncated checkpoint", "-q", "eval", "{case}/model.pt", "--data", "{data}", match="model.pt",
    setup=_corrupt_ckpt)
add("eval text checkpoint", "-q", "eval", "{case}/model.pt", "--data", "{data}", match="model.pt", setup=_text_ckpt)
add("eval foreign checkpoint", "-q", "eval", "{case}/model.pt", "--data", "{data}", match="neither",
    setup=_foreign_ckpt)
add("eval NaN weights", "-q", "eval", "{case}/model.pt", "--data", "{data}", match="NaN", setup=_nan_ckpt,
    tags=("silent",))
add("eval NaN features", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="NaN", setup=_nan_features,
    tags=("silent",))
add("eval huge caption line", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="characters",
    setup=_huge_caption, tags=("data",))
add("eval empty caption", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="empty caption",
    setup=_empty_caption)
add("eval caption count", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="captions for",
    setup=_missing_caption)
add("eval latin-1 captions", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="UTF-8",
    setup=_latin1_captions)
add("eval truncated features", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="test_ims.npy",
    setup=_truncated_features)
add("eval integer features", "-q", "eval", "{ckpt}", "--data", "{case}/data", match="float",
    setup=_int_features)
add("eval fold5 of 7 images", "-q", "eval", "{ckpt}", "--data", "{case}/data", "--fold5", match="5 folds",
    setup=_seven_images, tags=("traceback",))
add("eval unknown split", *EVAL, "--split", "nosuch", match="nosuch")
add("eval missing data", "-q", "eval", "{ckpt}", "--data", "{case}/none", match="not found")
add("eval device cuda", *EVAL, "--device", "cuda", match="cuda", tags=("device",))
add("eval device bogus", *EVAL, "--device", "tpu", match="not a device", tags=("device",))
add("eval vocab for itmatch checkpoint", *EVAL, "--vocab", "{data}/vocab.json", match="--vocab",
    tags=("silent",))
add("eval cxc with dtype", *EVAL, "--cxc", "{data}", "--dtype", "float32", match="--dtype", tags=("silent",))
add("eval cxc ensemble", "-q", "eval", "{ckpt}", "{ckpt}", "--data", "{data}", "--cxc", "{data}", match="one model")
add("eval box-compat on vsepp", *EVAL, "--box-compat", match="box-compat")
add("eval existing out", *EVAL, "--out", "{root}/out.json", match="--force", tags=("lost",))
add("eval existing plot", *EVAL, "--plot", "{case}/p.png", match="--force", setup=_existing("p.png"),
    tags=("lost",))
add("eval existing sims", *EVAL, "--save-sims", "{case}/s.npz", match="--force", setup=_existing("s.npz"),
    tags=("lost",))
add("eval out into a file path", *EVAL, "--out", "{root}/out.json/x.json", match="out.json")
add("eval scan release bad lambda type", "-q", "eval", "{case}/scan.pth.tar", "--data", "{data}", "--vocab",
    "{data}/vocab.json", match="lambda_softmax", setup=_scan_release({"lambda_softmax": "nine"}),
    tags=("traceback",))
add("eval scan release bad agg", "-q", "eval", "{case}/scan.pth.tar", "--data", "{data}", "--vocab",
    "{data}/vocab.json", match="agg_func", setup=_scan_release({"agg_func": "Bogus"}), tags=("traceback",))
add("eval scan release bad norm", "-q", "eval", "{case}/scan.pth.tar", "--data", "{data}", "--vocab",
    "{data}/vocab.json", match="raw_feature_norm", setup=_scan_release({"raw_feature_norm": 3}),
    tags=("traceback",))
add("eval unknown option", *EVAL, "--frobnicate", match="unrecognized")

# index build
for flag, value in [("--batch-size", "0"), ("--nlist", "0"), ("--nprobe", "-1"), ("--m", "0"),
                    ("--ef-construction", "0"), ("--ef-search", "0"), ("--train-size", "-5"), ("--kind", "lsh"),
                    ("--gallery", "both")]:
    add(f"index build {flag} {value}", *BUILD, flag, value, match=flag.lstrip("-").split("-")[0],
        tags=("numbers",))
add("index build existing index", "-q", "index", "build", "{ckpt}", "--data", "{data}", "--out", "{index}",
    match="--force", tags=("lost",))
add("index build NaN features", "-q", "index", "build", "{ckpt}", "--data", "{case}/data", "--out", "{case}/ix",
    match="NaN", setup=_nan_features, tags=("silent",))
add("index build NaN weights", "-q", "index", "build", "{case}/model.pt", "--data", "{data}", "--out",
    "{case}/ix", match="NaN", setup=_nan_ckpt, tags=("silent",))
add("index build missing data", "-q", "index", "build", "{ckpt}", "--data", "{case}/nope", "--out", "{case}/ix",
    match="not found")
add("index build device cuda", *BUILD, "--device", "cuda", match="cuda", tags=("device",))
add("index build no data flag", "-q", "index", "build", "{ckpt}", "--out", "{case}/ix", match="--data")

# search
add("search k 0", *SEARCH, "--text", "a red cube", "-k", "0", match="k", tags=("numbers",))
add("search k negative", *SEARCH, "--text", "a red cube", "-k", "-4", match="k", tags=("numbers",))
add("search candidates 0", *SEARCH, "--text", "a red cube", "--rerank", "{ckpt}", "--candidates", "0",
    match="candidates", tags=("numbers",))
add("search nprobe 0", *SEARCH, "--text", "a red cube", "--nprobe", "0", match="nprobe", tags=("numbers",))
add("search no query", *SEARCH, match="exactly one")
add("search two queries", *SEARCH, "--text", "a cube", "--image", "0", match="exactly one")
add("search missing index", "-q", "search", "{case}/none", "--text", "a cube", match="not found")
add("search permuted ids", "-q", "search", "{case}/index", "--text", "a red cube", match="changed",
    setup=_permuted_ids, tags=("index",))
add("search device index file", "-q", "search", "{case}/index", "--text", "a red cube", match="regular file",
    setup=_device_index, tags=("index",))
add("search text on caption index", "-q", "search", "{caps_index}", "--text", "a cube", match="holds captions")
add("search image on image index", *SEARCH, "--image", "0", match="holds images")
add("search unknown image id", "-q", "search", "{caps_index}", "--image", "999999", match="999999")
add("search boxes without features", *SEARCH, "--text", "a cube", "--image-boxes", "{case}/q.npy",
    match="--image-features", setup=_features_file(np.zeros((3, 4), np.float32)))
add("search device bogus", *SEARCH, "--text", "a cube", "--device", "quantum", match="not a device",
    tags=("device",))
add("search wrong ckpt", *SEARCH, "--text", "a cube", "--ckpt", "{case}/model.pt", match="model.pt",
    setup=_text_ckpt)
add("search features not npy", "-q", "search", "{caps_index}", "--image-features", "{case}/q.npy",
    match="q.npy", setup=_existing("q.npy"))

# encode-images
for flag, value in [("--batch-size", "0"), ("--chunk", "0"), ("--chunk", "-1"), ("--workers", "-1"),
                    ("--input-scale-factor", "0"), ("--input-scale-factor", "-2"), ("--input-scale-factor", "nan")]:
    add(f"encode-images {flag} {value}", *ENCODE, flag, value, match=flag.lstrip("-").split("-")[0],
        tags=("numbers",))
add("encode-images feature model", *ENCODE, match="raw-image")
add("encode-images missing ckpt", "-q", "encode-images", "{data}", "--ckpt", "{case}/none.pt", "--out",
    "{case}/e.npz", match="not found")

# serve (refused before the server starts)
for flag, value in [("--port", "70000"), ("--port", "0"), ("--port", "http"), ("--max-k", "0"),
                    ("--max-query-chars", "0"), ("--max-upload-mb", "0"), ("--max-running", "0"),
                    ("--max-waiting", "-1"), ("--candidates", "0")]:
    add(f"serve {flag} {value}", *SERVE, flag, value, match=flag.lstrip("-").split("-")[0], tags=("numbers",))
add("serve missing index", "-q", "serve", "--index", "{case}/none", match="not found")
add("serve two image indexes", "-q", "serve", "--index", "{index}", "--index", "{index}", match="two indexes")
add("serve device bogus", *SERVE, "--device", "npu", match="not a device", tags=("device",))

# data
add("data synth over a dataset", "-q", "data", "synth", "--out", "{data}", match="--force", tags=("lost",))
add("data synth dim 0", "-q", "data", "synth", "--out", "{case}/s", "--dim", "0", match="dim", tags=("numbers",))
add("data synth train images 0", "-q", "data", "synth", "--out", "{case}/s", "--train-images", "0",
    match="train", tags=("numbers",))
add("data synth bad variant", "-q", "data", "synth", "--out", "{case}/s", "--variant", "imagenet",
    match="variant")
add("data vocab over vocab.json", "-q", "data", "vocab", "{data}", match="--force", tags=("lost",))
add("data vocab threshold 0", "-q", "data", "vocab", "{data}", "--out", "{case}/v.json", "--threshold", "0",
    match="threshold", tags=("numbers",))
add("data vocab missing dir", "-q", "data", "vocab", "{case}/none", match="not found")
add("data check dims across splits", "-q", "data", "check", "{case}/data", match="",
    setup=_other_dim_dev, tags=("data",))
add("data check huge caption", "-q", "data", "check", "{case}/data", match="characters", setup=_huge_caption,
    tags=("data",))
add("data check NaN", "-q", "data", "check", "{case}/data", match="non-finite", setup=_nan_features)
add("data check missing dir", "-q", "data", "check", "{case}/none", match="not found")
add("data convert-butd binary", "-q", "data", "convert-butd", "--tsv", "{case}/f.tsv", "--ids", "{case}/ids.txt",
    "--out", "{case}/o", "--split", "train", match="f.tsv", setup=_binary_tsv, tags=("traceback",))
add("data convert-butd missing tsv", "-q", "data", "convert-butd", "--tsv", "{case}/none.tsv", "--ids",
    "{data}/test_ids.txt", "--out", "{case}/o", "--split", "test", match="not found")
add("data parse existing", "-q", "data", "parse", "--data", "{data}", "--split", "test", match="--force",
    tags=("lost",))
add("data import-karpathy missing", "-q", "data", "import-karpathy", "--json", "{case}/none.json", "--out",
    "{case}/k", match="none.json")
add("data import-manifest missing", "-q", "data", "import-manifest", "--manifest", "{case}/none.csv", "--out",
    "{case}/m", match="none.csv")
add("data import-regions regions 0", "-q", "data", "import-regions", "--features", "{case}", "--ids",
    "{data}/test_ids.txt", "--out", "{case}/r", "--split", "test", "--regions", "0", match="regions",
    tags=("numbers",))
add("data unknown command", "-q", "data", "explode", match="invalid choice")
add("unknown command", "-q", "frobnicate", match="invalid choice")
add("presets bad plugin", "--plugin", "{case}/plugin.py", "presets", match="failed to load", setup=_broken_plugin)
add("plugin without file", "presets", "--plugin", match="--plugin")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, world: dict, tmp_path: Path, capsys) -> None:
    own = tmp_path / "case"
    own.mkdir()
    if case.setup is not None:
        case.setup(own, world)
    before_world, before_own = _tree_digest(world["root"]), _tree_digest(own)
    fill = {"data": world["data"], "run": world["run"], "ckpt": world["ckpt"], "index": world["index"],
            "caps_index": world["caps_index"], "root": world["root"], "case": own}
    argv = [arg.format(**{k: str(v) for k, v in fill.items()}) for arg in case.argv]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, (code, err[-500:], out[-300:])
    assert len(lines) == 1 and lines[0].startswith("itmatch: error: "), err
    if case.match:
        assert case.match.lower() in lines[0].lower(), lines[0]
    assert _tree_digest(world["root"]) == before_world, "the command changed the shared files"
    kept = _tree_digest(own)
    assert {k: v for k, v in kept.items() if k in before_own} == before_own, "the command changed the case's files"


def test_the_table_covers_every_command() -> None:
    commands = {c.argv[c.argv.index("-q") + 1] if "-q" in c.argv else c.argv[-1] for c in CASES}
    assert {"train", "eval", "index", "search", "encode-images", "serve", "data"} <= commands
    assert len(CASES) >= 150, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("kill_at", [3])
def test_stale_temp_files_of_a_killed_write_are_removed_on_resume(world: dict, tmp_path: Path, kill_at: int) -> None:
    run = tmp_path / "run"
    assert main(["-q", "train", "--preset", "vsepp_synth", "--data", str(world["data"]), "--out", str(run),
                 "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "train.epochs=2",
                 "--set", "data.batch_size=20", "--set", f"train.max_steps={kill_at}"]) == 0
    stale = run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert stale.is_file()  # what a kill -9 mid-write leaves
    assert main(["-q", "train", "--resume", "--out", str(run)]) == 0
    assert not list(run.glob(".*.tmp"))


def test_nan_gradients_stop_training_before_the_step(world: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from itmatch.recipe import Recipe

    original = Recipe.loss

    def poisoned(self, *args, **kwargs):  # a finite loss whose gradients are NaN
        terms = original(self, *args, **kwargs)
        return {**terms, "loss": terms["loss"] + 0.0 * torch.sqrt(terms["loss"] * 0)}  # d sqrt(0) = inf

    monkeypatch.setattr(Recipe, "loss", poisoned)
    code = main(["-q", "train", "--preset", "vsepp_synth", "--data", str(world["data"]), "--out",
                 str(tmp_path / "run"), "--set", "model.embed_dim=16", "--set", "model.word_dim=8"])
    err = capsys.readouterr().err
    assert code == 2 and "gradients became nan" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing saved from the poisoned step

