"""LightningDataModules yielding [0,1] images, with the on-device Gaussian noise (T copies)."""

from dsr_lightning.errors import DataError

from .base import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SmoothingDataModule,
    TransformedSubset,
)
from .cifar10 import (
    SUBSET_PATH,
    SUBSET_SHA256,
    CIFAR10DataModule,
    CIFAR10SubsetDataModule,
    load_subset,
)
from .folder import ImageFolderDataModule, ImageLoader, ImageNetDataModule
from .npz import NpzDataModule, ToFloat, load_npz
from .synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "SUBSET_PATH", "SUBSET_SHA256", "CIFAR10DataModule", "CIFAR10SubsetDataModule", "DataError",
    "ImageFolderDataModule", "ImageLoader", "ImageNetDataModule", "NpzDataModule",
    "SmoothingDataModule", "SyntheticDataModule", "ToFloat", "TransformedSubset", "load_npz",
    "load_subset",
]
