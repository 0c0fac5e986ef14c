"""In-package ResNet/ResNeXt backbones: torchvision key names and sizes, Caffe layout, frozen BN, unfreezing."""

import dataclasses

import pytest
import torch

from itmatch.errors import CheckpointError
from itmatch.modules.backbones import SPECS, ResNet, butd_state_dict, create_backbone

# Parameter counts of torchvision's ImageNet classifiers (from its model documentation).
TORCHVISION_PARAMS = {
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext101_32x8d": 88_791_336,
}
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3),
          "resnext101_32x8d": (3, 4, 23, 3)}


def torchvision_keys(name: str) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes torchvision's `models.<name>()` has, written out from its layout."""
    groups, per_group = (32, 8) if name.startswith("resnext") else (1, 64)
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for stage, n in enumerate(BLOCKS[name]):
        planes = 64 * 2**stage
        width = planes * per_group // 64 * groups
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            bn(f"{p}.bn2", width)
            keys[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys["fc.weight"], keys["fc.bias"] = (1000, 2048), (1000,)
    return keys


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_torchvision_names_shapes_and_sizes(name: str) -> None:
    model = create_backbone(name, num_classes=1000, device="meta")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == torchvision_keys(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_torchvision_state_dict_loads_strictly() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) if s else torch.tensor(7))
             for k, s in torchvision_keys("resnet50").items()}
    for k in state:
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
    model = create_backbone("resnet50", num_classes=1000)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_grid_shape_of_big_backbones(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    with torch.no_grad():
        grid = model.grid(torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, 2 * 2, 2048)


def test_grid_is_the_row_major_flattened_map() -> None:
    torch.manual_seed(0)
    model = create_backbone("resnet_tiny").eval()
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        fmap = model.feature_map(images)
        grid = model.grid(images)
    assert fmap.shape == (2, model.out_channels, 3, 2)
    assert grid.shape == (2, 6, model.out_channels) and model.out_channels == 512
    assert torch.equal(grid[1, 3], fmap[1, :, 1, 1])  # cell (row 1, col 1) of a 2-wide map


@pytest.mark.parametrize("size, caffe, torchvision", [(98, 3, 4), (100, 4, 4), (512, 16, 16), (256, 8, 8)])
def test_caffe_layout_output_size(size: int, caffe: int, torchvision: int) -> None:
    """Hand-computed: 98 -> conv1 49 -> ceil-mode pool without padding 24 (torchvision's padded pool: 25) ->
    1x1 stride-2 convs 12, 6, 3 (torchvision's padded 3x3: 13, 7, 4)."""
    tiny = {"blocks": (1, 1, 1, 1), "stem_width": 8}
    caffe_net = ResNet(dataclasses.replace(SPECS["butd_resnet101"], **tiny)).eval()
    tv_net = ResNet(dataclasses.replace(SPECS["resnet50"], **tiny)).eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        assert caffe_net.feature_map(x).shape[-2:] == (caffe, caffe)
        assert tv_net.feature_map(x).shape[-2:] == (torchvision, torchvision)
    block = caffe_net.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert tv_net.layer2[0].conv1.stride == (1, 1) and tv_net.layer2[0].conv2.stride == (2, 2)
    assert caffe_net.maxpool.padding == 0 and caffe_net.maxpool.ceil_mode


def test_butd_base_top_file_loads_strictly() -> None:
    model = create_backbone("butd_resnet101", device="meta")
    own = model.state_dict()
    base_of = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    base, top = {}, {}
    gen = torch.Generator().manual_seed(0)
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            continue  # the converted Caffe file has no such buffers
        head, rest = key.split(".", 1)
        tensor = torch.randn(tuple(value.shape), generator=gen)
        if head == "layer4":
            top[f"0.{rest}"] = tensor
        else:
            base[f"{base_of[head]}.{rest}"] = tensor
    state = butd_state_dict({"base": base, "top": top})
    real = create_backbone("butd_resnet101")
    real.load_state_dict(state, strict=True)
    assert torch.equal(real.layer4[2].conv3.weight, top["0.2.conv3.weight"])
    assert torch.equal(real.layer1[0].downsample[1].running_mean, base["4.0.downsample.1.running_mean"])
    with pytest.raises(CheckpointError, match="'base' and 'top'"):
        butd_state_dict({"model": {}})


def test_batchnorm_frozen_in_training_and_stagewise_unfreezing() -> None:
    torch.manual_seed(0)
    model = create_backbone("resnet_tiny")
    model.train()
    assert model.training and all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = model.bn1.running_mean.clone()
    model.grid(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(model.bn1.running_mean, before)  # running statistics untouched
    trainable = {k: [p.requires_grad for p in m.parameters()]
                 for k, m in [("stem", model.conv1), ("l1", model.layer1), ("l3", model.layer3), ("l4", model.layer4)]}
    assert all(all(v) for v in trainable.values())
    model.set_fixed_blocks(3)
    assert not model.conv1.weight.requires_grad and not any(p.requires_grad for p in model.layer3.parameters())
    assert all(p.requires_grad for p in model.layer4.parameters())
    model.set_fixed_blocks(4)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_fixed_blocks(1)
    assert not any(p.requires_grad for p in model.layer1.parameters()) and not model.bn1.weight.requires_grad
    assert all(p.requires_grad for p in model.layer2.parameters())
