"""The model zoo: pure-PyTorch architectures behind a timm-style registry.

>>> from strsparse.models import create_model, list_models
>>> model = create_model("resnet50", num_classes=1000)  # torchvision-compatible state_dict

Registered models: ``resnet18``, ``resnet50`` (ImageNet, torchvision layout), ``mobilenet_v1``
(ImageNet, ``width_multiplier``), ``resnet20``, ``resnet56`` (CIFAR, option-A shortcuts),
``lenet5`` and ``lenet_300_100`` (28x28 inputs), ``fastgrnn`` (sequences: batch, time,
features; low-rank W and U with ``rank_w`` / ``rank_u``).

Every model class declares its classifier's module name as the class attribute
``classifier_name`` (``"fc"`` for the ResNets and MobileNetV1, ``"fc3"`` for the LeNets); use
:func:`classifier_name` to read it for any model, which falls back to the last weighted layer
for models from elsewhere. FLOPs accounting calls everything else the "backbone".
Each model also carries ``input_shape`` (C, H, W), the per-sample input it is built for;
:func:`default_input_shape` reads it by name.
"""

from . import cifar_resnet, fastgrnn, lenet, mobilenet, resnet
from .cifar_resnet import CifarResNet
from .fastgrnn import FastGRNN
from .lenet import LeNet5, LeNet300100
from .mobilenet import MobileNetV1
from .registry import (
    classifier_name,
    create_model,
    default_input_shape,
    list_models,
    model_options,
    register_model,
)
from .resnet import ResNet

__all__ = [
    "CifarResNet",
    "FastGRNN",
    "LeNet300100",
    "LeNet5",
    "MobileNetV1",
    "ResNet",
    "cifar_resnet",
    "classifier_name",
    "create_model",
    "default_input_shape",
    "fastgrnn",
    "lenet",
    "list_models",
    "mobilenet",
    "model_options",
    "register_model",
    "resnet",
]
