"""LightningDataModules yielding [0,1] images, with the on-device Gaussian noise (T copies)."""

from dsr_lightning.errors import DataError

from .base import CIFAR10_CLASSES, SmoothingDataModule, TransformedSubset
from .cifar10 import (
    SUBSET_PATH,
    SUBSET_SHA256,
    CIFAR10DataModule,
    CIFAR10SubsetDataModule,
    load_subset,
)
from .synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10_CLASSES", "SUBSET_PATH", "SUBSET_SHA256", "CIFAR10DataModule",
    "CIFAR10SubsetDataModule", "DataError", "SmoothingDataModule", "SyntheticDataModule",
    "TransformedSubset", "load_subset",
]
