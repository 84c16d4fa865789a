"""The config layer: the Hydra tree's location (`dsr_lightning/conf`, inside the package, found
through Hydra's `pkg://` search path), the schema (`config.schema`: types, and the only range and
choice checks), resolvers, and composing in code. Only jobs read a composed config."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dsr_lightning.config import schema
from dsr_lightning.data.base import path_tag

CONFIG_MODULE = "dsr_lightning.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def fmt2(value) -> str:
    """σ as the published folders spell it: 0.25 -> '0.25', 0.5 -> '0.50', 1 -> '1.00'. A value
    that is no finite number is returned as given: the schema check names it later."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.2f}" if math.isfinite(v) else str(value)


def first(*values):
    """The first value that is not null (`${first:${certify.bound},${system.bound}}`)."""
    return next((v for v in values if v is not None), None)


def tag(prefix: str, value) -> str:
    """`${tag:_t,${threshold}}`: '' for null, else the prefix and the value ('_t0.5')."""
    if value is None:
        return ""
    return f"{prefix}{value:g}" if isinstance(value, int | float) else f"{prefix}{value}"


def safe_name(text: str, limit: int = 160) -> str:
    """A job folder's name from Hydra's override_dirname: path separators become '_' (a path in
    an override, e.g. pretrained_root=a/b, would nest the folder), and a long name is cut and
    given a short hash so it stays unique and within the file system's limit."""
    import hashlib

    text = str(text).replace("/", "_").replace("\\", "_")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}~{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def basename(path) -> str:
    """`${basename:${data.root}}`: a folder's (or file's) name, for names of runs and exports."""
    return Path(str(path)).name if path else "none"


def data_tag(path, stem: bool = False) -> str:
    """`${data_tag:${data.root}}` (`${data_tag:${data.path},true}`: a file's stem): the name of a
    data folder (file) with a short hash of its absolute real path, `pets-1a2b3c4d`, for the
    names of exports and runs: two folders `pets` in different places get different names, one
    folder the same name from any working directory (data.base.path_tag)."""
    return path_tag(path, stem=bool(stem))


def given() -> str:
    """`${given:}`: the folder of the networks shipped inside the package (the demo's f, its
    noise-trained copies and the small denoisers, in the published layout: jobs/given.py)."""
    return str(Path(__file__).resolve().parent.parent / "pretrained_models")


def interactive() -> bool:
    """`${interactive:}`: whether the output is a terminal (a progress bar redraws in place there;
    in a log file it prints nothing or a line of carriage returns)."""
    import sys

    return sys.stdout.isatty()


def bf16_here() -> bool:
    """`${bf16_here:}`: whether bf16 autocast pays on this machine: a CUDA GPU with bf16, or a CPU
    with bf16 instructions (avx512_bf16 or AMX; elsewhere a CPU emulates bf16, slower than fp32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def bf16_precision() -> str:
    """`${bf16_precision:}`: Lightning's precision where bf16 pays (bf16_here), else fp32."""
    return "bf16-mixed" if bf16_here() else "32-true"


def stem(path) -> str:
    """`${stem:${classifier.path}}`: a file's name without its suffixes."""
    return Path(str(path)).name.split(".")[0] if path else "none"


def leaf(target) -> str:
    """`${leaf:${classifier.net._target_}}`: the last component of a dotted name, lowercase."""
    return str(target).rsplit(".", 1)[-1].lower() if target else "none"


def run_dir(ckpt_path, default: str) -> str:
    """hydra.run.dir: a resumed run (ckpt_path=<run>/checkpoints/<file>.ckpt) continues in <run>;
    anything else gets `default`, a new folder."""
    if ckpt_path:
        p = Path(str(ckpt_path))
        if p.parent.name == "checkpoints":
            return str(p.parent.parent)
    return default


def record_dir(ckpt_path, stamp: str) -> str:
    """hydra.output_subdir: `.hydra` for a new run; `.hydra/resumes/<stamp>` for a resume, so the
    record of how the run was started is never overwritten by a resume (refused or not)."""
    return f".hydra/resumes/{stamp}" if ckpt_path else ".hydra"


def _hydra_node():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    """True inside a job of a Hydra multirun (a sweep)."""
    from hydra.types import RunMode

    hc = _hydra_node()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def sweep_dir() -> Path:
    """The folder of the running sweep (inside a multirun job)."""
    return Path(str(_hydra_node().sweep.dir))


def sweep_group(default: str) -> str:
    """The W&B group of a job: the sweep's folder name in a multirun (one group per sweep), else
    `default`."""
    return sweep_dir().name if is_multirun() else default


def unique_name(base: str) -> str:
    """A run name unique within its group: `<base>-<job number>` in a multirun, else
    `<base>-<run folder name>` (its timestamp)."""
    hc = _hydra_node()
    if hc is None:
        return base
    if is_multirun():
        return f"{base}-{hc.job.num}"
    out = hc.runtime.get("output_dir")
    return f"{base}-{Path(str(out)).name}" if out else base


for _name, _fn in (("fmt2", fmt2), ("first", first), ("tag", tag), ("safe_name", safe_name),
                   ("basename", basename), ("data_tag", data_tag), ("given", given),
                   ("interactive", interactive), ("bf16_here", bf16_here),
                   ("bf16_precision", bf16_precision),
                   ("stem", stem), ("leaf", leaf),
                   ("run_dir", run_dir), ("record_dir", record_dir),
                   ("sweep_group", sweep_group), ("unique_name", unique_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
schema.register()


def compose(config_name: str = "train", overrides: list[str] | None = None,
            return_hydra_config: bool = True) -> DictConfig:
    """Compose a config of the package's tree in code (tests, notebooks, the training job's
    certification), with the hydra node filled in unless asked otherwise. Inside a running Hydra
    app the app's search path is used."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)


def to_dict(cfg: DictConfig) -> dict:
    """The resolved config without Hydra's own node: what checkpoints and result files record."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out
