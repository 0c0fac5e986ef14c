import pytest

from itmatch.config import config_from_dict, config_to_dict, list_presets, load_preset, parse_override
from itmatch.errors import ConfigError
from itmatch.registry import create_model, list_models


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_parses_and_builds(name: str, tiny_bert) -> None:
    import dataclasses

    cfg = load_preset(name)
    assert cfg.model.name in list_models()
    model_cfg = cfg.model
    fields = {f.name for f in dataclasses.fields(model_cfg)}
    updates = {k: v for k, v in (("vocab_size", 20), ("image_dim", 16), ("bert_path", str(tiny_bert))) if k in fields}
    if getattr(model_cfg, "backbone", ""):  # the full-size CNNs and their weight files are tested in test_backbones
        updates |= {"backbone": "resnet_tiny", "backbone_weights": ""}
    model = create_model(dataclasses.replace(model_cfg, **updates))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert config_from_dict(config_to_dict(cfg)) == cfg  # round trip through a checkpoint's dict


def test_grid_presets_mirror_the_original_train_grid_script() -> None:
    cfg = load_preset("vse_infinity_coco_butd_grid_bert")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.backbone, m.backbone_lr_factor, m.embedding_warmup_epochs, m.backbone_warmup_epochs) == (
        "butd_resnet101", 0.01, 1, 0)
    assert (m.vse_mean_warmup_epochs, m.backbone_frozen_bn, d.source, d.input_scale_factor) == (1, True, "images", 2.0)
    assert (t.epochs, t.lr_update, t.lr, d.batch_size) == (25, 15, 5e-4, 128)
    assert load_preset("vse_infinity_f30k_wsl_grid_bert").model.backbone == "resnext101_32x8d"


def test_vsepp_presets_mirror_the_original_command_lines() -> None:
    cfg = load_preset("vsepp_f30k_precomp")
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.lr_update) == (30, 2e-4, 15)
    assert cfg.train.max_violation and cfg.train.margin == 0.2 and cfg.train.grad_clip == 2.0
    assert cfg.data.batch_size == 128 and cfg.model.embed_dim == 1024 and cfg.model.word_dim == 300
    assert not load_preset("vse0_coco_precomp").train.max_violation


def test_overrides_are_typed() -> None:
    cfg = load_preset("vsepp_synth", ["train.lr=1e-3", "train.epochs=2", "data.path=/x/y", "model.no_imgnorm=true"])
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 2 and cfg.data.path == "/x/y" and cfg.model.no_imgnorm
    assert parse_override("data.path=some dir") == ("data", "path", "some dir")


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", "unknown key 'lrr'"),
    ("train.lr=fast", "expected a number"),
    ("train.epochs=1.5", "expected an integer"),
    ("train.max_violation=1", "expected true or false"),
    ("optim.lr=1", "unknown section"),
    ("lr=1", "expected section.key=value"),
    ("model.name=nope", "unknown model 'nope'"),
])
def test_bad_overrides_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_preset("vsepp_synth", [override])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("vsepp_imaginary")
