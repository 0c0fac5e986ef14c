"""`itmatch encode-images`: a folder of photos -> embeddings, resumable by chunks, unreadable files one line."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from itmatch.checkpoints.loader import load_model
from itmatch.cli import main
from itmatch.data.images import image_size
from itmatch.encode import encode_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint of a tiny grid model trained one step on rendered scenes, folder of 7 photos)."""
    from itmatch.data.synthetic import generate

    root = tmp_path_factory.mktemp("enc")
    data = root / "synth"
    generate(data, seed=0, dim=8, sizes={"train": 8, "dev": 4, "test": 4}, render=True)
    assert main(["-q", "data", "vocab", str(data)]) == 0
    sets = ["data.input_scale_factor=0.125", "data.batch_size=8", "train.epochs=1", "train.max_steps=1",
            "data.train_images=0", "model.embed_dim=16"]
    assert main(["-q", "train", "--preset", "vse_infinity_synth_grid", "--data", str(data), "--out",
                 str(root / "run"), *[a for s in sets for a in ("--set", s)]]) == 0
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, png in enumerate(sorted((data / "images").glob("*.png"))[:7]):
        shutil.copy(png, photos / ("sub" if i % 2 else "") / png.name)
    (photos / "notes.txt").write_text("not an image")
    return root / "run" / "checkpoint.pt", photos


def test_encode_images_resumes_after_an_interruption(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, photos = trained
    loaded = load_model(ckpt)
    size = image_size(loaded.config.data.input_scale_factor)

    def stop_after_first(k: int) -> None:
        if k == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_folder(loaded.model, photos, tmp_path / "a.npz", size=size, normalisation="imagenet", chunk=3,
                      on_chunk=stop_after_first)
    part = tmp_path / "a.npz.parts" / "000000.npz"
    assert part.is_file() and not (tmp_path / "a.npz").exists()
    np.savez(part, **{**np.load(part), "embeddings": np.load(part)["embeddings"] + 1})  # marks chunk 0 as reused
    done = []
    summary = encode_folder(loaded.model, photos, tmp_path / "a.npz", size=size, normalisation="imagenet", chunk=3,
                            on_chunk=done.append)
    assert done == [1, 2] and summary == {"images": 7, "skipped": 0, "dim": 16, "out": str(tmp_path / "a.npz")}
    assert not (tmp_path / "a.npz.parts").exists()
    out = np.load(tmp_path / "a.npz")
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    assert out["paths"].tolist() == names
    fresh = encode_folder(loaded.model, photos, tmp_path / "b.npz", size=size, normalisation="imagenet", chunk=5)
    assert fresh["images"] == 7
    ref = np.load(tmp_path / "b.npz")["embeddings"]
    np.testing.assert_allclose(out["embeddings"][3:], ref[3:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["embeddings"][:3], ref[:3] + 1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, rtol=1e-5)
    from itmatch.index import GalleryIndex

    index = GalleryIndex.build(np.load(tmp_path / "b.npz")["embeddings"], np.load(tmp_path / "b.npz")["paths"].tolist())
    _, rows = index.search(ref[4:5], k=1)
    assert index.ids_of(rows) == [[names[4]]]  # each photo finds itself


def test_cli_encode_images_and_a_corrupt_photo(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    ckpt, photos = trained
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    assert main(["-q", "encode-images", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "e.npz")]) == 0
    assert "wrote 7 embeddings of size 16" in capsys.readouterr().out
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = main(["-q", "encode-images", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "f.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{folder / 'broken.jpg'}: cannot decode image" in err
    assert (tmp_path / "f.npz.parts" / "manifest.json").is_file()  # the rerun below resumes this one
    code = main(["-q", "encode-images", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "f.npz"),
                 "--skip-bad", "--workers", "2"])
    assert code == 0 and "1 unreadable images skipped" in capsys.readouterr().out
    assert np.load(tmp_path / "f.npz")["skipped"].tolist() == ["broken.jpg"]


def test_feature_models_are_refused(tiny_data: Path, tmp_path: Path, capsys) -> None:
    assert main(["-q", "train", "--preset", "vsepp_synth", "--data", str(tiny_data), "--out", str(tmp_path / "r"),
                 "--set", "train.max_steps=1", "--set", "train.epochs=1", "--set", "model.embed_dim=8"]) == 0
    code = main(["-q", "encode-images", str(tmp_path), "--ckpt", str(tmp_path / "r" / "checkpoint.pt"), "--out",
                 str(tmp_path / "x.npz")])
    assert code == 2 and "needs a raw-image embedding model" in capsys.readouterr().err
