"""MobileNetV1 (Howard et al., 2017) for ImageNet, with a width multiplier.

Layout (the names other code relies on, e.g. budgets and FLOPs tables):

- ``conv1``: 3x3 stride-2 conv, ``in_channels -> 32 w``, no bias; ``bn1``; ``relu``.
- ``blocks``: ``nn.Sequential`` of 13 :class:`DepthwiseSeparable` blocks, each with ``dw``
  (3x3 depthwise conv, ``groups = channels``), ``dw_bn``, ``pw`` (1x1 pointwise conv), ``pw_bn``,
  and a ReLU after each BN. Output channels / strides follow Table 1 of the paper:
  (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), 5 x (512, 1), (1024, 2), (1024, 1).
- ``avgpool`` (global average pool) and ``fc``: ``nn.Linear(1024 w, num_classes)``.

That is 28 weight layers: ``conv1``, ``blocks.{0..12}.dw``, ``blocks.{0..12}.pw``, ``fc``. At
width 1.0 and 1000 classes they hold 4,209,088 weights (``fc``: 1,024,000), and a 224x224 input
costs 568,740,352 multiply-accumulates without the pool (Table 8 of the STR paper). The last
block keeps stride 1 (the feature map is already 7x7), as in common implementations.

The width multiplier scales every channel count: ``round(c * w)``, at least 1.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import check_positive_float, check_positive_int, register_model

__all__ = ["MOBILENET_V1_PLAN", "DepthwiseSeparable", "MobileNetV1", "mobilenet_v1"]

#: (output channels, stride) of the 13 depthwise-separable blocks at width 1.0.
MOBILENET_V1_PLAN: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _scaled(channels: int, width_multiplier: float) -> int:
    return max(1, round(channels * width_multiplier))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (no conv biases)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )  # weight: (C_in, 1, 3, 3)
        self.dw_bn = nn.BatchNorm2d(in_channels)
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)  # (C_out, C_in, 1, 1)
        self.pw_bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.dw_bn(self.dw(x)))
        return self.relu(self.pw_bn(self.pw(x)))


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier ``width_multiplier`` (the paper's alpha)."""

    classifier_name = "fc"

    def __init__(
        self, *, num_classes: int = 1000, in_channels: int = 3, width_multiplier: float = 1.0
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        self.input_shape = (in_channels, 224, 224)
        width = check_positive_float(width_multiplier, "width_multiplier")
        self.width_multiplier = width
        channels = _scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        for out_channels, stride in MOBILENET_V1_PLAN:
            out_channels = _scaled(out_channels, width)
            blocks.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 32 w, H/2, W/2)
        x = self.blocks(x)  # (N, 1024 w, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 1024 w)
        return self.fc(x)


@register_model
def mobilenet_v1(
    *, num_classes: int = 1000, in_channels: int = 3, width_multiplier: float = 1.0
) -> MobileNetV1:
    """MobileNetV1; 4,209,088 conv + linear weights at width 1.0 and 1000 classes."""
    return MobileNetV1(
        num_classes=num_classes, in_channels=in_channels, width_multiplier=width_multiplier
    )
