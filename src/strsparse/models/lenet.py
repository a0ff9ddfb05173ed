"""Small models for 28x28 inputs (Fashion-MNIST, MNIST): a LeNet-5-like CNN and LeNet-300-100.

``lenet5`` is a modern take on LeCun et al. (1998): two 5x5 conv stages (16 and 32 filters)
with BatchNorm, ReLU and 2x2 max-pooling, then three linear layers. It is sized to train an
epoch of Fashion-MNIST in seconds on a laptop CPU and reach about 90% test accuracy within a
few epochs. Layers::

    conv1  Conv2d(in_channels, 16, 5, padding=2)   (N, 16, 28, 28) -> pool -> (N, 16, 14, 14)
    bn1    BatchNorm2d(16)                          (only with batch_norm=True)
    conv2  Conv2d(16, 32, 5)                        (N, 32, 10, 10) -> pool -> (N, 32, 5, 5)
    bn2    BatchNorm2d(32)                          (only with batch_norm=True)
    fc1    Linear(32 * 5 * 5, 256)
    fc2    Linear(256, 128)
    fc3    Linear(128, num_classes)                 the classifier

Convs carry a bias only when ``batch_norm=False`` (a bias before BN is redundant).

``lenet_300_100`` is the fully connected LeNet-300-100 (LeCun et al., 1998) used throughout the
pruning literature: ``fc1`` (in_channels * 28 * 28 -> 300), ``fc2`` (300 -> 100), ``fc3``
(100 -> num_classes), ReLU between them.

Both take ``image_size`` (default 28) for square inputs of another size.
"""

from __future__ import annotations

import torch
from torch import nn

from strsparse.errors import OptionError

from .registry import check_positive_int, register_model

__all__ = ["LeNet5", "LeNet300100", "lenet5", "lenet_300_100"]


class LeNet5(nn.Module):
    """LeNet-5-like CNN: conv1 -> conv2 -> fc1 -> fc2 -> fc3 (see the module docstring)."""

    classifier_name = "fc3"

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        batch_norm: bool = True,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(image_size, "image_size")
        self.input_shape = (in_channels, image_size, image_size)
        # conv1 keeps the size (padding 2) then pools; conv2 (no padding) removes 4 then pools.
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise OptionError(f"image_size must be >= 12 for lenet5, got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(16, 32, 5, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * side * side, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))  # (N, 16, 14, 14)
        x = self.pool(self.relu(self.bn2(self.conv2(x))))  # (N, 32, 5, 5)
        x = torch.flatten(x, 1)  # (N, 800)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet300100(nn.Module):
    """LeNet-300-100 MLP: flatten -> fc1 (300) -> fc2 (100) -> fc3 (num_classes)."""

    classifier_name = "fc3"

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(image_size, "image_size")
        self.input_shape = (in_channels, image_size, image_size)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (N, C * H * W)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


@register_model
def lenet5(
    *, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = True, image_size: int = 28
) -> LeNet5:
    """LeNet-5-like CNN for 28x28 inputs; 252,538 parameters with BN and 10 classes."""
    return LeNet5(
        num_classes=num_classes,
        in_channels=in_channels,
        batch_norm=batch_norm,
        image_size=image_size,
    )


@register_model
def lenet_300_100(
    *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
) -> LeNet300100:
    """LeNet-300-100 MLP; 266,610 parameters for 1x28x28 inputs and 10 classes."""
    return LeNet300100(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
