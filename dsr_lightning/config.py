"""Config helpers shared by the entry points: resolvers, the config directory, composing in code."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def fmt2(value) -> str:
    """σ as the published folders spell it: 0.25 -> '0.25', 0.5 -> '0.50', 1 -> '1.00'."""
    return f"{float(value):.2f}"


if not OmegaConf.has_resolver("fmt2"):
    OmegaConf.register_new_resolver("fmt2", fmt2)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config of conf/ in code (tests, notebooks), with the hydra node filled in."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides or []), return_hydra_config=True)


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config without Hydra's own node: what checkpoints and result files record."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out
