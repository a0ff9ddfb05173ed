"""CIFAR ResNets (He et al., CVPR 2016, Section 4.2): ResNet-(6n+2) for 32x32 inputs.

A 3x3 conv with 16 filters, then three stages of ``n`` BasicBlocks with 16, 32 and 64 filters
(feature maps 32, 16, 8), global average pooling and a linear classifier ``fc``. ResNet-20 has
n = 3 (269,722 parameters at 10 classes), ResNet-56 has n = 9 (853,018).

Shortcuts follow the paper's option A by default: where a block halves the spatial size and
doubles the channels, the shortcut subsamples the input by 2 and zero-pads the new channels, so
every shortcut is parameter-free and the parameter counts match the paper's. ``shortcut="B"``
uses a 1x1 conv + BN projection there instead (as the ImageNet models do). Either way the
shortcut module is named ``downsample`` in its block, as in torchvision's ResNet, so layer
names look alike across the families (``layer2.0.conv1``, ``layer2.0.downsample.0``, ``fc``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strsparse.errors import OptionError

from .registry import check_positive_int, register_model

__all__ = [
    "ChannelPlacement",
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet56",
]

ShortcutKind = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels up to ``out_channels``.

    The zero channels are split evenly before and after the input's channels, as in the
    common reference implementation of the paper's CIFAR models.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise OptionError(
                f"option-A shortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, H/s, W/s)
        extra = self.out_channels - self.in_channels
        before = extra // 2
        return F.pad(x, (0, 0, 0, 0, before, extra - before))  # (N, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def channel_sources(self) -> list[int | None]:
        """For each output channel, the input channel it copies (None: a zero channel);
        ``strsparse.slim`` reads it to follow channels through the shortcut."""
        before = (self.out_channels - self.in_channels) // 2
        return [
            c - before if 0 <= c - before < self.in_channels else None
            for c in range(self.out_channels)
        ]

    def slimmed(self, in_keep: list[bool], out_keep: list[bool]) -> nn.Module:
        """The shortcut for the kept input and output channels (slim keeps a channel on
        both sides or on neither)."""
        new_index = {c: i for i, c in enumerate(c for c, k in enumerate(in_keep) if k)}
        sources = [
            None if src is None else new_index[src]
            for src, keep in zip(self.channel_sources(), out_keep, strict=True)
            if keep
        ]
        return ChannelPlacement(sum(in_keep), sources, self.stride)


class ChannelPlacement(nn.Module):
    """Subsample by ``stride``, then place input channel ``sources[j]`` at output channel j
    (a zero channel where ``sources[j]`` is None): a slimmed option-A shortcut."""

    dst: Tensor
    src: Tensor

    def __init__(self, in_channels: int, sources: list[int | None], stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stride = stride
        self.sources = [None if s is None else int(s) for s in sources]
        dst = [j for j, s in enumerate(self.sources) if s is not None]
        src = [s for s in self.sources if s is not None]
        self.register_buffer("dst", torch.tensor(dst, dtype=torch.long), persistent=False)
        self.register_buffer("src", torch.tensor(src, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, H/s, W/s)
        out = x.new_zeros(x.shape[0], len(self.sources), x.shape[2], x.shape[3])
        out[:, self.dst] = x[:, self.src]
        return out

    def channel_sources(self) -> list[int | None]:
        return list(self.sources)

    def slimmed(self, in_keep: list[bool], out_keep: list[bool]) -> nn.Module:
        new_index = {c: i for i, c in enumerate(c for c, k in enumerate(in_keep) if k)}
        sources = [
            None if src is None else new_index[src]
            for src, keep in zip(self.sources, out_keep, strict=True)
            if keep
        ]
        return ChannelPlacement(sum(in_keep), sources, self.stride)

    def describe(self) -> dict[str, Any]:
        """Constructor arguments as plain data (a slim model's saved architecture)."""
        return {"in_channels": self.in_channels, "sources": self.sources, "stride": self.stride}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {len(self.sources)}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs (no bias) with BN, and an identity / option-A / option-B shortcut."""

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: ShortcutKind = "A"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR-sized inputs; ``depth`` must be 6n + 2 (20, 32, 44, 56, 110...)."""

    classifier_name = "fc"

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: ShortcutKind = "A",
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        self.input_shape = (in_channels, 32, 32)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or depth % 6 != 2:
            raise OptionError(
                f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}"
            )
        if shortcut not in ("A", "B"):
            raise OptionError(
                f"shortcut must be 'A' (zero-padding) or 'B' (1x1 conv), got {shortcut!r}"
            )
        n = (depth - 2) // 6
        self.shortcut = shortcut
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBasicBlock(self.in_planes, planes, stride, self.shortcut)]
        self.in_planes = planes
        layers += [CifarBasicBlock(planes, planes, 1, self.shortcut) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 64)
        return self.fc(x)


@register_model
def resnet20(
    *, num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutKind = "A"
) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3); 269,722 parameters with option-A shortcuts and 10 classes."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


@register_model
def resnet56(
    *, num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutKind = "A"
) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9); 853,018 parameters with option-A shortcuts and 10 classes."""
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
