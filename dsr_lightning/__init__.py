"""Denoised smoothing with sample rejection, on PyTorch Lightning and Hydra.

The Python API is here, loaded on first use (so `import dsr_lightning` stays cheap):

    import dsr_lightning as dsr
    g = dsr.load("outputs/.../checkpoints/best.ckpt")
    cert = g.certify(x, n0=100, n=10_000, alpha=0.001, batch_size=1000)

`load`, `wrap`, `train_rejector`, `Smooth`, `Certificate`, `Certificates` and `ABSTAIN` are those
of `dsr_lightning.api`.
"""

import importlib

__version__ = "0.1.0"

# the Python API's names, imported from dsr_lightning.api on first use
_API = ("ABSTAIN", "Certificate", "Certificates", "Smooth", "load", "train_rejector", "wrap")
# the subpackages reachable as attributes (dsr.data.CIFAR10SubsetDataModule), imported on first use
_MODULES = ("api", "data", "errors", "models", "reports", "results", "smoothing")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module("dsr_lightning.api"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"dsr_lightning.{name}")
    else:
        raise AttributeError(f"module 'dsr_lightning' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_MODULES})
