"""ResNet / ResNeXt backbones in plain PyTorch that return grid features, for raw-image models.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Xie et al., "Aggregated Residual
Transformations for Deep Neural Networks" (ResNeXt), CVPR 2017. Written from the architecture description, with
torchvision's parameter names (`conv1`, `bn1`, `layer1`..`layer4` of bottlenecks `convN`/`bnN`/`downsample.0/.1`,
`fc`) so that torchvision and WSL (`resnext101_32x8d_wsl`) state dicts load with `strict=True`.

Two layouts (VSE-infinity's `lib/modules/resnet.py`, github.com/woodfrog/vse_infty @ 29df9d6):
* torchvision ("ResNet v1.5"): the stride of a downsampling bottleneck sits on its 3x3 conv; max-pool k3 s2 p1;
* Caffe / bottom-up-attention detector ("butd"): the stride sits on the first 1x1 conv; max-pool k3 s2 with no
  padding and `ceil_mode=True`. Its weights ship as `original_updown_backbone.pth` = {'base': Sequential(conv1,
  bn1, relu, maxpool, layer1, layer2, layer3), 'top': Sequential(layer4)}; `butd_state_dict` renames them.

`ResNet.grid(images)` returns the last stage's map flattened row-major, (B, h*w, C) (512x512 input -> 16x16 = 256
vectors of 2048). All BatchNorms stay in eval mode even when the module trains, as upstream (`train()` is
overridden); `set_fixed_blocks(k)` is upstream's stage-wise unfreezing (4: all frozen, 3: only layer4 trains, ...,
0: everything trains).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.errors import CheckpointError, ConfigError

Layout = Literal["torchvision", "caffe"]


@dataclass(frozen=True, slots=True)
class ResNetSpec:
    blocks: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    stem_width: int = 64  # channels after conv1; stage k has stem_width * 2**k bottleneck planes
    layout: Layout = "torchvision"


SPECS: dict[str, ResNetSpec] = {
    "resnet50": ResNetSpec((3, 4, 6, 3)),
    "resnet101": ResNetSpec((3, 4, 23, 3)),
    "resnet152": ResNetSpec((3, 8, 36, 3)),
    "resnext101_32x8d": ResNetSpec((3, 4, 23, 3), groups=32, width_per_group=8),
    "butd_resnet101": ResNetSpec((3, 4, 23, 3), layout="caffe"),
    # Trained from scratch on the rendered synthetic scenes in a few CPU minutes: one bottleneck per stage, 1/4 width.
    "resnet_tiny": ResNetSpec((1, 1, 1, 1), stem_width=16, width_per_group=16),
}
EXPANSION = 4  # bottleneck output channels = 4 x planes


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (grouped) -> 1x1 with a residual; `layout` says which conv carries the stride."""

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, groups: int = 1, width_per_group: int = 64,
                 layout: Layout = "torchvision", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        width = int(planes * (width_per_group / 64.0)) * groups
        out = planes * EXPANSION
        s1, s3 = (stride, 1) if layout == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=s1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(width, **dd)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, groups=groups, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(width, **dd)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False, **dd),
                                            nn.BatchNorm2d(out, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet/ResNeXt with torchvision's names; `num_classes=0` leaves out the classifier `fc`."""

    def __init__(self, spec: ResNetSpec, *, num_classes: int = 0, frozen_bn: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.spec, self.frozen_bn = spec, frozen_bn
        w = spec.stem_width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(w, **dd)
        self.relu = nn.ReLU(inplace=True)
        if spec.layout == "caffe":
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = w
        stages = []
        for k, n in enumerate(spec.blocks):
            planes, stride = w * 2**k, 1 if k == 0 else 2
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=stride if i == 0 else 1, groups=spec.groups,
                                         width_per_group=spec.width_per_group, layout=spec.layout, **dd))
                inplanes = planes * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = inplanes
        self.fc = nn.Linear(inplanes, num_classes, **dd) if num_classes else None
        for m in self.modules():  # He init for convs, unit BN, as the usual from-scratch recipe
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fixed_blocks = 0

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(images))))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w), the output of layer4."""
        x = self.layer3(self.layer2(self.layer1(self.stem(images))))
        return self.layer4(x)

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h*w, C) grid vectors, row-major over the map."""
        return self.feature_map(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) when built with a classifier, else the grid (B, h*w, C)."""
        if self.fc is None:
            return self.grid(images)
        return self.fc(self.feature_map(images).mean(dim=(2, 3)))

    def train(self, mode: bool = True) -> ResNet:
        """Train the convolutions but keep every BatchNorm on its running statistics (upstream freezes them;
        `frozen_bn=False` lets them train, which a network trained from scratch needs)."""
        super().train(mode)
        if not self.frozen_bn:
            return self
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def stages(self) -> list[list[nn.Module]]:
        """[stem, layer1, layer2, layer3, layer4]: the units `set_fixed_blocks` freezes from the input on."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def set_fixed_blocks(self, fixed_blocks: int) -> None:
        """Freeze the stem and the first `fixed_blocks` stages (upstream `unfreeze_base`): 4 = all frozen, 3 = only
        layer4 trains, 0 = everything trains. The classifier `fc` is never trained."""
        if not 0 <= fixed_blocks <= 4:
            raise ConfigError(f"fixed_blocks must be in 0..4, got {fixed_blocks}")
        self.fixed_blocks = fixed_blocks
        for k, units in enumerate(self.stages()):
            frozen = k <= fixed_blocks if k else fixed_blocks > 0
            for unit in units:
                unit.requires_grad_(not frozen)
        if self.fc is not None:
            self.fc.requires_grad_(False)

    def base_parameters(self) -> list[nn.Parameter]:
        """Upstream `backbone.base` (stem + layer1..3)."""
        return [p for units in self.stages()[:4] for u in units for p in u.parameters()]

    def top_parameters(self) -> list[nn.Parameter]:
        """Upstream `backbone.top` (layer4)."""
        return list(self.layer4.parameters())


def backbone_normalisation(name: str) -> str:
    """Pixel normalisation a backbone was trained with: Caffe-style BGR minus means for the BUTD detector, ImageNet
    mean/std for the others."""
    return "detector" if name.startswith("butd") else "imagenet"


def backbone_ddp_refusal(method: str, backbone: str) -> str | None:
    """Why torchrun training does not apply to a model with a backbone: it unfreezes its stages during training."""
    if not backbone:
        return None
    return (f"{method} with a backbone unfreezes its stages during training, which DDP (set up with the weights "
            "trainable at the start) would not synchronise; train it in one process")


def create_backbone(name: str, *, num_classes: int = 0, frozen_bn: bool = True,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ResNet:
    if name not in SPECS:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(SPECS)}")
    return ResNet(SPECS[name], num_classes=num_classes, frozen_bn=frozen_bn, device=device, dtype=dtype)


def load_backbone_weights(model: ResNet, path: str | os.PathLike) -> None:
    """Load ImageNet/WSL weights (a torchvision-layout state dict, optionally under 'state_dict' or with a
    `module.` prefix) or the BUTD {'base', 'top'} file into `model`, strictly; a classifier the model lacks
    (`fc.*`) is dropped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"backbone weights not found: {path}") from None
    except Exception as err:  # torch raises many types for unreadable files
        raise CheckpointError(f"{path}: cannot read backbone weights ({type(err).__name__}: {err})") from None
    if isinstance(ckpt, Mapping) and set(ckpt) == {"base", "top"}:
        state = butd_state_dict(ckpt)
    else:
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
            ckpt = ckpt["state_dict"]
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{path}: expected a state dict of a ResNet")
        state = {k.removeprefix("module."): v for k, v in ckpt.items()}
        if model.fc is None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: backbone weights do not fit {type(model).__name__} (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}); is it the right architecture?")
    model.load_state_dict(state, strict=True)


_BUTD_BASE = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


def butd_state_dict(ckpt: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`original_updown_backbone.pth` ({'base': ..., 'top': ...}) -> state dict of `create_backbone('butd_resnet101')`.

    `num_batches_tracked` buffers the converted file may lack are filled with 0 (they are unused: BN is frozen).
    """
    if not isinstance(ckpt, Mapping) or set(ckpt) != {"base", "top"}:
        raise CheckpointError("not a BUTD backbone file: expected a dict with exactly 'base' and 'top' state dicts")
    out: dict[str, torch.Tensor] = {}
    for key, value in ckpt["base"].items():
        head, _, rest = key.partition(".")
        if head not in _BUTD_BASE:
            raise CheckpointError(f"BUTD backbone: unexpected key base.{key} (base holds modules 0, 1, 4, 5, 6)")
        out[f"{_BUTD_BASE[head]}.{rest}"] = value
    for key, value in ckpt["top"].items():
        if not key.startswith("0."):
            raise CheckpointError(f"BUTD backbone: unexpected key top.{key} (top holds layer4 as module 0)")
        out[f"layer4.{key.removeprefix('0.')}"] = value
    for key in list(out):
        if key.endswith(".running_var"):
            out.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return out
