"""CIFAR-100 architectures of the CRD benchmark (ResNet, Wide-ResNet, VGG), written for this example.

Every model takes ``[B, 3, 32, 32]`` images and ends in a single ``nn.Linear`` named ``fc``, so
the penultimate feature that CRCD distils is exactly ``fc``'s input.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "CifarResNet",
    "WideResNet",
    "VGG",
    "MODEL_NAMES",
    "create_model",
    "count_parameters",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def _three_stages(
    block: Callable[[int, int, int], nn.Module], widths: Sequence[int], blocks_per_stage: int
) -> Tuple[nn.Sequential, int]:
    """Three stages of ``blocks_per_stage`` blocks, widths ``widths[1:]``, strides 1, 2, 2.

    Returns:
        The stages as one ``nn.Sequential`` and the output channel count.
    """
    stages: List[nn.Module] = []
    in_channels = widths[0]
    for out_channels, stride in zip(widths[1:], (1, 2, 2)):
        blocks = []
        for index in range(blocks_per_stage):
            blocks.append(block(in_channels, out_channels, stride if index == 0 else 1))
            in_channels = out_channels
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages), in_channels


class _BasicBlock(nn.Module):
    """Post-activation residual block: two 3x3 convs, a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) in the CRD benchmark's three-stage form.

    A 3x3 stem, three stages of ``(depth - 2) // 6`` basic blocks at strides 1, 2, 2, global
    average pooling and a linear classifier ``fc``.

    Args:
        depth: Total depth; ``depth - 2`` must be a multiple of 6 (8, 20, 32, 56, ...).
        widths: Four channel counts: the stem, then the three stages
            (``[16, 16, 32, 64]`` for resnetN, ``[32, 64, 128, 256]`` for the x4 variants).
        num_classes: Size of the classifier output.

    Shape:
        input ``[B, 3, 32, 32]``, output ``[B, num_classes]``; ``fc`` input ``[B, widths[3]]``.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 20, 32, 56, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 channel counts (stem + 3 stages), got {list(widths)}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            _conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.stages, in_channels = _three_stages(_BasicBlock, widths, blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        feature = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.fc(feature)


class _WideBlock(nn.Module):
    """Pre-activation wide residual block (BN-ReLU-conv twice), as in Zagoruyko & Komodakis."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = torch.relu(self.bn1(x))
        # The projection reads the activated input, the usual choice for pre-activation WRNs.
        shortcut = x if self.projection is None else self.projection(activated)
        out = self.conv1(activated)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """Wide-ResNet-depth-k for CIFAR (three stages of widths ``16k, 32k, 64k``).

    Args:
        depth: Total depth; ``depth - 4`` must be a multiple of 6 (16, 28, 40, ...).
        widen_factor: The width multiplier ``k``.
        num_classes: Size of the classifier output.

    Shape:
        input ``[B, 3, 32, 32]``, output ``[B, num_classes]``; ``fc`` input ``[B, 64 * k]``.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(3, widths[0])
        self.stages, in_channels = _three_stages(_WideBlock, widths, blocks_per_stage)
        self.final = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        feature = self.pool(self.final(self.stages(self.stem(x)))).flatten(1)
        return self.fc(feature)


class VGG(nn.Module):
    """VGG with batch norm for 32x32 inputs: five conv groups, the last one globally pooled.

    Args:
        groups: Channel counts of the 3x3 convs in each of the five groups.
        num_classes: Size of the classifier output.

    Shape:
        input ``[B, 3, 32, 32]``, output ``[B, num_classes]``; ``fc`` input ``[B, groups[-1][-1]]``.
    """

    def __init__(self, groups: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        if len(groups) != 5 or any(len(group) == 0 for group in groups):
            raise ValueError(f"groups must be 5 non-empty lists of channel counts, got {groups}")
        layers: List[nn.Module] = []
        in_channels = 3
        for position, group in enumerate(groups):
            for out_channels in group:
                layers += [
                    _conv3x3(in_channels, out_channels),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
            # Four 2x poolings take 32x32 to 2x2; the fifth group is pooled globally instead.
            if position < len(groups) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        feature = self.pool(self.features(x)).flatten(1)
        return self.fc(feature)


_SMALL = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

_FACTORIES: Dict[str, Callable[[int], nn.Module]] = {
    "resnet8": lambda n: CifarResNet(8, _SMALL, n),
    "resnet20": lambda n: CifarResNet(20, _SMALL, n),
    "resnet32": lambda n: CifarResNet(32, _SMALL, n),
    "resnet56": lambda n: CifarResNet(56, _SMALL, n),
    "resnet8x4": lambda n: CifarResNet(8, _WIDE, n),
    "resnet32x4": lambda n: CifarResNet(32, _WIDE, n),
    "wrn_16_2": lambda n: WideResNet(16, 2, n),
    "wrn_40_2": lambda n: WideResNet(40, 2, n),
    "vgg8": lambda n: VGG([[64], [128], [256], [512], [512]], n),
    "vgg13": lambda n: VGG([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], n),
}

MODEL_NAMES: List[str] = sorted(_FACTORIES)


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build one of the CRD-benchmark CIFAR models by name.

    Args:
        name: One of ``MODEL_NAMES`` (``"resnet8x4"``, ``"wrn_40_2"``, ``"vgg13"``, ...).
        num_classes: Size of the classifier output.

    Returns:
        The model, freshly initialised, with its classifier at ``.fc``.

    Raises:
        ValueError: If ``name`` is unknown or ``num_classes`` is not positive.

    Example:
        >>> model = create_model("resnet8x4")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _FACTORIES[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    for model_name in MODEL_NAMES:
        print(f"{model_name:12s} {count_parameters(create_model(model_name)) / 1e6:6.2f}M")
