"""Raw-image datasets: layout, transforms against hand-computed crops, unreadable images, synthetic renders."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmatch.data.images import (
    BGR_MEANS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSplit,
    crop_box,
    decode,
    image_size,
    resize_bilinear,
    transform,
)
from itmatch.errors import DataError


class StubRng:
    """Returns preset draws: random() from `uniforms`, integers(n) from `ints` (checked to be < n)."""

    def __init__(self, uniforms: list[float], ints: list[int]) -> None:
        self.uniforms, self.ints, self.highs = list(uniforms), list(ints), []

    def random(self) -> float:
        return self.uniforms.pop(0)

    def integers(self, high: int) -> int:
        self.highs.append(high)
        value = self.ints.pop(0)
        assert 0 <= value < high
        return value


def test_bilinear_uses_half_pixel_centres() -> None:
    row = np.array([[[0], [100]]], dtype=np.uint8)  # 1 x 2
    out = resize_bilinear(row, 1, 4)[0, :, 0]
    # output x samples (x + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    np.testing.assert_allclose(out, [0, 25, 75, 100])


def test_crop_box_follows_upstream_draws() -> None:
    rng = StubRng([0.5], [0, 1])  # ratio 0.6 + 0.4 * 0.5 = 0.8
    assert crop_box(10, 5, rng) == (1, 0, 8, 4)  # (top, left, h, w): int(10 * .8), int(5 * .8)
    assert rng.highs == [1, 2]  # left offset drawn in [0, 5 - 4), then top in [0, 10 - 8)
    assert crop_box(10, 10, StubRng([0.999999], [0, 0])) == (0, 0, 9, 9)  # int(10 * 0.9999996) = 9


def test_train_transform_against_a_hand_computed_crop() -> None:
    y, x = np.mgrid[0:10, 0:5]
    image = np.repeat((10 * y + x).astype(np.uint8)[..., None], 3, axis=2)  # pixel = 10 row + col
    out = transform(image, 4, "imagenet", StubRng([0.5, 0.9], [0, 1]))  # crop rows 1..8, cols 0..3; flip
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    # 8 x 4 -> 4 x 4: output row d averages crop rows 2d, 2d+1 (image rows 2d+1, 2d+2); columns kept, flipped.
    d, c = np.mgrid[0:4, 0:4]
    expected = 10 * (2 * d + 1.5) + (3 - c)
    for ch in range(3):
        np.testing.assert_allclose(out[ch], (expected / 255 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch], rtol=1e-5)


def test_eval_transform_resizes_whole_image_and_detector_normalisation(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 10  # red-ish
    Image.fromarray(rgb).save(tmp_path / "a.png")
    bgr = decode(tmp_path / "a.png", bgr=True)
    assert bgr[0, 0].tolist() == [10, 0, 200]
    out = transform(bgr, 4, "detector")  # no rng: whole image, no flip
    assert out.shape == (3, 4, 4)
    np.testing.assert_allclose(out[:, 1, 2], np.array([10, 0, 200]) - BGR_MEANS, rtol=1e-6)
    assert image_size(2.0) == 512 and image_size(0.25) == 64


def write_image_dataset(root: Path, n: int = 3, *, bad: dict[int, bytes] | None = None) -> Path:
    """VSE-infinity layout: precomp/{split}_caps.txt + _ids.txt, id_mapping.json, flickr30k-images/."""
    (root / "precomp").mkdir(parents=True)
    (root / "flickr30k-images").mkdir()
    ids = [7 + 2 * i for i in range(n)]
    mapping = {}
    for k, i in enumerate(ids):
        name = f"img{i}.jpg"
        mapping[str(i)] = name
        if bad and k in bad:
            (root / "flickr30k-images" / name).write_bytes(bad[k])
        else:
            Image.fromarray(np.full((12, 16, 3), 30 * k, dtype=np.uint8)).save(root / "flickr30k-images" / name)
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    (root / "precomp" / "train_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "precomp" / "train_caps.txt").write_text("".join(f"a red cube {k} .\n" for k in range(5 * n)))
    return root / "precomp"


def test_image_split_reads_the_vse_infinity_layout(tmp_path: Path) -> None:
    split = ImageSplit(write_image_dataset(tmp_path), "train", input_scale_factor=0.0625, workers=2)
    assert (split.n_images, split.n_captions, split.im_div, split.image_of(7)) == (3, 15, 5, 1)
    assert split.images.paths[2] == tmp_path / "flickr30k-images" / "img11.jpg"
    batch = split.images[np.array([2, 0])]
    assert batch.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(batch[0, 0, 0, 0], (60 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=0.03)
    images, kept = split.training_images([0, 1, 2], np.random.default_rng(0))
    assert images.shape == (3, 3, 16, 16) and kept == [0, 1, 2]


def test_corrupt_jpeg_is_one_clear_line(tmp_path: Path) -> None:
    root = write_image_dataset(tmp_path, bad={1: b"\xff\xd8\xff\xe0 this is not a jpeg"})
    split = ImageSplit(root, "train", input_scale_factor=0.0625)
    with pytest.raises(DataError) as err:
        split.images[np.array([0, 1])]
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "flickr30k-images" / "img9.jpg") in message
    assert "cannot decode image" in message
    with pytest.raises(DataError, match="img9.jpg"):
        split.training_images([0, 1, 2], np.random.default_rng(0))


def test_truncated_and_missing_images_and_skip_option(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((40, 40, 3), 99, dtype=np.uint8)).save(good)
    root = write_image_dataset(tmp_path / "d", bad={0: good.read_bytes()[:200]})
    (tmp_path / "d" / "flickr30k-images" / "img11.jpg").unlink()
    split = ImageSplit(root, "train", input_scale_factor=0.0625)
    with pytest.raises(DataError, match="img11.jpg: image not found"):
        split.images[2]
    with pytest.raises(DataError, match="img7.jpg: cannot decode"):
        split.images[0]
    skipping = ImageSplit(root, "train", input_scale_factor=0.0625, skip_bad=True)
    images, kept = skipping.training_images([0, 1, 2, 1], np.random.default_rng(0))
    assert kept == [1, 3] and images.shape == (2, 3, 16, 16)
    assert sum("skipping" in r.message for r in caplog.records) == 2


def test_layout_errors_name_the_file(tmp_path: Path) -> None:
    root = write_image_dataset(tmp_path)
    mapping = json.loads((tmp_path / "id_mapping.json").read_text())
    del mapping["9"]
    (tmp_path / "id_mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(DataError, match=r"id_mapping.json: no entry for image id 9"):
        ImageSplit(root, "train")
    (tmp_path / "id_mapping.json").unlink()
    with pytest.raises(DataError, match="no id_mapping.json"):
        ImageSplit(root, "train")


def test_synthetic_render_is_a_raw_image_dataset(tmp_path: Path) -> None:
    from itmatch.data.synthetic import generate

    generate(tmp_path, seed=0, dim=8, sizes={"train": 3, "test": 2}, render=True)
    split = ImageSplit(tmp_path, "test", input_scale_factor=0.125)
    assert split.n_images == 2 and split.images[np.array([0, 1])].shape == (2, 3, 32, 32)
    assert split.images.paths[0].parent == tmp_path / "images"


def test_rendering_leaves_the_other_files_unchanged(tmp_path: Path) -> None:
    from itmatch.data.synthetic import generate

    sizes = {"train": 3, "dev": 2, "test": 2}
    generate(tmp_path / "plain", seed=1, dim=8, sizes=sizes)
    generate(tmp_path / "render", seed=1, dim=8, sizes=sizes, render=True)
    plain = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in (tmp_path / "render").iterdir()) == sorted([*plain, "images", "id_mapping.json"])
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "render" / name).read_bytes(), name
