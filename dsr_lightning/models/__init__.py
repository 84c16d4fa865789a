"""Networks (Cohen-compatible CIFAR ResNet, DnCNN, MemNet, the rejector), the normalising
classifier wrapper, the f_R composition and checkpoint import/export. No Lightning, no Hydra."""

from .checkpoint import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCES,
    CheckpointError,
    build_arch,
    load_checkpoint,
    load_published,
    load_scripted,
    load_state_dict_strict,
    load_weights,
    non_finite_keys,
    read_checkpoint,
    save_checkpoint,
    state_dict_of,
    state_sha256,
)
from .dncnn import DnCNN
from .memnet import MemNet
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Classifier, NormalizeLayer
from .rejector import FeatureRejector, Rejector
from .resnet import BasicBlock, ResNet
from .system import SmoothingSystem, freeze

__all__ = [
    "ARCHS", "BasicBlock", "CIFAR10_MEAN", "CIFAR10_STD", "CheckpointError", "Classifier", "DnCNN",
    "FeatureRejector", "IMAGENET_MEAN", "IMAGENET_STD", "MemNet", "NormalizeLayer", "Rejector",
    "ResNet", "SOURCES", "SmoothingSystem", "build_arch", "freeze", "load_checkpoint", "load_published",
    "load_scripted", "load_state_dict_strict", "load_weights", "non_finite_keys",
    "read_checkpoint", "save_checkpoint", "state_dict_of", "state_sha256",
]
