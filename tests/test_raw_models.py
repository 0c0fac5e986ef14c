"""Raw-image models: VSE-infinity grid variant, VSE++ with a CNN, and training them on rendered synthetic scenes."""

import json
from pathlib import Path

import pytest
import torch

from itmatch.config import load_preset
from itmatch.models.vse_infinity import VseInfinityConfig, backbone_fixed_blocks, grid_size_augment
from itmatch.models.vsepp import VseppConfig
from itmatch.registry import create_model
from tests.conftest import training_recipe

VOCAB = 30


def batch(b: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 8, (b,), generator=gen)
    captions = torch.randint(4, VOCAB, (b, int(lengths.max())), generator=gen)
    return torch.randn(b, 3, size, size, generator=gen), captions, lengths


def grid_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = VseInfinityConfig(vocab_size=VOCAB, embed_dim=16, word_dim=8, backbone="resnet_tiny", **kw)
    return create_model(cfg)


def test_grid_model_shapes_gradients_and_eval_determinism() -> None:
    model = grid_model(backbone_frozen_bn=False)
    recipe = training_recipe(model)
    images, captions, lengths = batch()
    recipe.on_epoch_start(0)  # default warm-up: the whole backbone frozen in epoch 0
    assert not any(p.requires_grad for p in model.img_enc.backbone.parameters())
    recipe.on_epoch_start(2)  # then layer4 only
    assert all(p.requires_grad for p in model.img_enc.backbone.layer4.parameters())
    assert not any(p.requires_grad for p in model.img_enc.backbone.layer3.parameters())
    model.img_enc.backbone.set_fixed_blocks(0)
    model.train()
    recipe.loss(images, captions, lengths, epoch=0)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.eval()
    with torch.no_grad():
        a, b = model.encode_image(images).emb, model.encode_image(images).emb
    assert a.shape == (4, 16) and torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4))


def test_grid_size_augmentation() -> None:
    torch.manual_seed(0)
    grid = torch.arange(1, 2 * 5 * 3 + 1, dtype=torch.float32).view(2, 5, 3).repeat(200, 1, 1)  # (400, 5, 3)
    out, lengths = grid_size_augment(grid)
    assert out.shape[1] == int(lengths.max()) <= 5
    for i in range(len(grid)):
        n = int(lengths[i])
        kept = out[i, :n]
        # kept cells are a subsequence of the original cells, in order, and the rest is zero
        rows = [int((grid[i] == kept[j]).all(dim=1).nonzero()[0]) for j in range(n)]
        assert rows == sorted(rows) and not out[i, n:].any()
    full = (lengths == 5).float().mean()
    # P(all 5 kept) = 0.2 + integral over r in (0.2, 1) of (1 - 0.2 r)^5 = 0.2 + (0.96^6 - 0.8^6) / 1.2 = 0.634
    assert 0.56 < full < 0.71


@pytest.mark.parametrize("epoch, warmup, windows, fixed", [(0, 1, 0, 4), (1, 1, 0, 0), (1, 2, 5, 4), (2, 2, 5, 3),
                                                           (7, 2, 5, 2), (12, 2, 5, 1), (17, 2, 5, 0), (40, 2, 5, 0)])
def test_backbone_unfreezing_schedule(epoch: int, warmup: int, windows: int, fixed: int) -> None:
    assert backbone_fixed_blocks(epoch, warmup, windows) == fixed


def test_loss_warm_up_in_the_first_backbone_epoch() -> None:
    model = grid_model(embedding_warmup_epochs=1)
    recipe = training_recipe(model)
    images, captions, lengths = batch()
    model.eval()  # no grid augmentation: the same loss every call
    losses = {}
    for epoch, step in [(0, 3), (1, 0), (1, 3), (2, 3)]:
        recipe.on_epoch_start(epoch)
        recipe.on_step_start(step, 4)
        with torch.no_grad():
            losses[epoch, step] = float(recipe.loss(images, captions, lengths, epoch=epoch)["loss"])
    assert losses[1, 0] == 0.0
    assert losses[1, 3] == pytest.approx(0.75 * losses[2, 3])  # step 3 of 4 in the first backbone epoch
    assert losses[0, 3] == pytest.approx(losses[2, 3])  # unscaled before and after


def test_grid_optimizer_groups() -> None:
    model = grid_model(backbone_lr_factor=0.01)
    opt = training_recipe(model).optimizer(1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5, 1e-5, 1e-3]
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))


def test_vsepp_cnn_encoder_is_frozen_unless_finetuned() -> None:
    torch.manual_seed(0)
    images, captions, lengths = batch()
    frozen = create_model(VseppConfig(vocab_size=VOCAB, embed_dim=16, word_dim=8, backbone="resnet_tiny"))
    assert not any(p.requires_grad for p in frozen.img_enc.cnn.parameters())
    assert frozen.encode_image(images).emb.shape == (4, 16)
    tuned = create_model(VseppConfig(vocab_size=VOCAB, embed_dim=16, word_dim=8, backbone="resnet_tiny",
                                     finetune=True))
    training_recipe(tuned).loss(images, captions, lengths, epoch=0)["loss"].backward()
    assert tuned.img_enc.cnn.conv1.weight.grad is not None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from itmatch.cli import main
    from itmatch.data.synthetic import generate

    root = tmp_path_factory.mktemp("render") / "synth"
    generate(root, seed=0, dim=8, sizes={"train": 16, "dev": 6, "test": 6}, render=True)
    assert main(["-q", "data", "vocab", str(root)]) == 0
    return root


@pytest.mark.parametrize("preset", ["vse_infinity_synth_grid", "vsepp_synth_cnn"])
def test_train_and_evaluate_on_rendered_scenes(preset: str, rendered: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from itmatch.cli import main

    sets = ["data.input_scale_factor=0.125", "data.batch_size=8", "train.epochs=1", "data.train_images=0",
            "model.embed_dim=16"]
    code = main(["-q", "train", "--preset", preset, "--data", str(rendered), "--out", str(tmp_path / "run"),
                 "--test", *[a for s in sets for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err
    assert "rsum" in capsys.readouterr().out.lower()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["source"] == "images"


def test_source_and_backbone_must_agree(rendered: Path, tmp_path: Path) -> None:
    from itmatch.errors import ConfigError
    from itmatch.training import fit

    cfg = load_preset("vse_infinity_synth_grid", [f"data.path={json.dumps(str(rendered))}", "data.source='features'"])
    with pytest.raises(ConfigError, match="data.source=images"):
        fit(cfg, tmp_path / "a")
    cfg = load_preset("vse_infinity_synth_bigru", [f"data.path={json.dumps(str(rendered))}", "data.source='images'"])
    with pytest.raises(ConfigError, match="model.backbone"):
        fit(cfg, tmp_path / "b")


def test_demo_extended_mode_trains_on_the_rendered_scenes(rendered: Path, tmp_path: Path, capsys) -> None:
    from itmatch.cli import main

    sets = ["data.input_scale_factor=0.125", "data.batch_size=8", "train.epochs=1", "data.train_images=0",
            "model.embed_dim=16"]
    code = main(["-q", "demo", "--raw", "--data", str(rendered), "--out", str(tmp_path / "demo"),
                 *[a for s in sets for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err
    assert "VSE-infinity grid on the rendered test scenes" in capsys.readouterr().out
    assert (tmp_path / "demo" / "raw" / "report.json").is_file()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_training_image_is_one_line(rendered: Path, tmp_path: Path, capsys, workers: int) -> None:
    import shutil

    from itmatch.cli import main

    data = tmp_path / "data"
    shutil.copytree(rendered, data)
    bad = sorted((data / "images").glob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated PNG
    sets = ["data.input_scale_factor=0.125", "data.batch_size=80", "train.epochs=1", "data.train_images=0",
            "model.embed_dim=16", f"data.workers={workers}"]
    code = main(["-q", "train", "--preset", "vse_infinity_synth_grid", "--data", str(data), "--out",
                 str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"itmatch: error: {bad}: cannot decode image")
