"""A pretrained diffusion model as a one-step denoiser (denoised smoothing with a DDPM; docs/diffusion.md).

A DDPM is trained to undo x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε at every timestep t, in images scaled to
[−1, 1]. Denoised smoothing hands it x + δ, δ ~ N(0, σ²) in [0, 1] pixels, which in the model's units
is z = 2(x + δ) − 1 = x₀ + 2σ·ε. Scaled by √ᾱ_t, z is exactly the model's input at t when
√((1 − ᾱ_t) / ᾱ_t) = 2σ: the noise-to-signal ratio of timestep t is the one of σ.

- **t\\*** is the timestep whose ratio √((1 − ᾱ_t) / ᾱ_t) is nearest to 2σ (ratios grow with t); the
  model sees √ᾱ_t* · z, whose signal is scaled as at t* and whose noise is √ᾱ_t* · 2σ, the model's
  √(1 − ᾱ_t*) up to the schedule's step (`noise_mismatch` is the relative difference).
- **One step**: the model's output at t* gives the estimate x̂₀ of its prediction type (epsilon:
  x̂₀ = z − √((1 − ᾱ)/ᾱ) · ε̂; sample: x̂₀ = the output; v_prediction: x̂₀ = √ᾱ · x_t − √(1 − ᾱ) · v̂),
  clipped to [−1, 1] as the sampler clips, mapped back to [0, 1].
- σ beyond the schedule (2σ above the last timestep's ratio) is refused, naming the largest σ it
  supports; so are class-conditional UNets and prediction types other than those three.

The forward is deterministic (no noise of its own, the UNet in eval mode): the certification's
noise stays the only randomness, so the certificates of the smoothed classifier hold as with any
denoiser. Its weights are the model's, read from the model folder (or the hub), never stored in a
rejector checkpoint: the checkpoint records the model and the hash of its weights, and a rebuild
refuses a folder whose weights changed (jobs/networks.py).

diffusers is an optional dependency (`pip install "dsr_lightning[diffusion]"`), imported only here
and only when a diffusion denoiser is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsr_lightning.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
EXTRA = 'pip install "dsr_lightning[diffusion]" (in a checkout: pip install ".[diffusion]")'


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ConfigError(f"denoiser=diffusion needs the diffusers library, which is not installed "
                          f"({e}): {EXTRA}") from None
    return diffusers


def noise_ratios(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """√((1 − ᾱ_t) / ᾱ_t) per timestep: the noise level of timestep t in the model's [−1, 1] units,
    relative to the signal (float64)."""
    ab = alphas_cumprod.to(torch.float64)
    return ((1 - ab) / ab).sqrt()


def max_sigma(alphas_cumprod: torch.Tensor) -> float:
    """The largest σ (pixel units, images in [0, 1]) a schedule supports: half the last timestep's
    noise ratio."""
    return float(noise_ratios(alphas_cumprod)[-1]) / 2


def timestep_for(sigma: float, alphas_cumprod: torch.Tensor) -> int:
    """t*: the timestep whose noise ratio √((1 − ᾱ_t) / ᾱ_t) is nearest to 2σ. σ ≤ 0 or beyond the
    schedule is one ConfigError naming the largest σ it supports."""
    sigma = float(sigma)
    top = max_sigma(alphas_cumprod)
    if not sigma > 0:
        raise ConfigError(f"sigma={sigma:g}: a diffusion denoiser needs sigma > 0")
    if 2 * sigma > 2 * top * (1 + 1e-9):
        raise ConfigError(f"sigma={sigma:g} is beyond the diffusion model's noise schedule: its "
                          f"last timestep matches sigma={top:.4g}; choose sigma <= {top:.4g}")
    return int(torch.argmin((noise_ratios(alphas_cumprod) - 2 * sigma).abs()))


class DiffusionDenoiser(nn.Module):
    """D(x + δ) = the one-step estimate x̂₀ of a DDPM's UNet at the timestep t* matching σ (see the
    module's docstring), for noisy images in [0, 1] pixels; returns images in [0, 1].

    `unet`: a diffusers `UNet2DModel` (or any module taking (sample, timestep) and returning an
    object with `.sample` or a tensor); `alphas_cumprod`: the scheduler's ᾱ_t; `prediction_type`:
    epsilon | sample | v_prediction; `learned_variance`: the UNet's output holds the variance's
    channels after the prediction's (improved DDPM), which are dropped."""

    weights_outside_checkpoint = True  # the model's own files hold them (tasks.base, jobs.networks)

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, sigma: float,
                 prediction_type: str = "epsilon", learned_variance: bool = False):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"the diffusion model's scheduler predicts {prediction_type!r}: a "
                              f"one-step denoiser is defined for {', '.join(PREDICTION_TYPES)}")
        self.unet = unet
        self.sigma = float(sigma)
        self.timestep = timestep_for(sigma, alphas_cumprod)
        ab = float(alphas_cumprod[self.timestep])
        self.alpha_bar = ab
        self.prediction_type = prediction_type
        self.learned_variance = bool(learned_variance)
        # the noise the model sees (√ᾱ · 2σ) against the noise it expects at t* (√(1 − ᾱ))
        self.noise_mismatch = abs(math.sqrt(ab) * 2 * self.sigma / math.sqrt(1 - ab) - 1)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) noisy images x + δ in [0, 1] pixel units -> denoised (B, C, H, W) in [0, 1]."""
        ab = self.alpha_bar
        z = noisy * 2 - 1                                   # x₀ + 2σ·ε in the model's units
        x_t = math.sqrt(ab) * z                             # the model's input at t*
        t = torch.full((noisy.shape[0],), self.timestep, device=noisy.device, dtype=torch.long)
        out = self.unet(x_t, t)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        if self.learned_variance:
            out = out[:, : noisy.shape[1]]
        if self.prediction_type == "epsilon":
            x0 = (x_t - math.sqrt(1 - ab) * out) / math.sqrt(ab)
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v_prediction
            x0 = math.sqrt(ab) * x_t - math.sqrt(1 - ab) * out
        return ((x0.clamp(-1, 1) + 1) / 2).to(noisy.dtype)

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma:g}, timestep={self.timestep}, alpha_bar={self.alpha_bar:.6g}, "
                f"prediction_type={self.prediction_type}")


def _layout(model: str) -> tuple[str, str | None, str | None]:
    """(where, the UNet's subfolder, the scheduler's subfolder) of a model reference: a local folder
    in diffusers' save_pretrained layout, either a pipeline's (unet/, scheduler/) or a model's own
    (config.json + weights, scheduler_config.json beside them), else a hub id (a pipeline's layout,
    tried first)."""
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "unet" / "config.json").is_file():
            sched = "scheduler" if (p / "scheduler").is_dir() else None
            return str(p), "unet", sched
        if (p / "config.json").is_file():
            sched = "scheduler" if (p / "scheduler" / "scheduler_config.json").is_file() else None
            return str(p), None, sched
        raise ConfigError(f"denoiser.model={model}: the folder holds no diffusers model (no "
                          "config.json, no unet/config.json); save one with "
                          "UNet2DModel.save_pretrained(folder) and its scheduler with "
                          "scheduler.save_pretrained(folder), or pass a hub id")
    if p.exists():
        raise ConfigError(f"denoiser.model={model} is a file: pass the folder diffusers' "
                          "save_pretrained wrote (or a hub id, e.g. google/ddpm-cifar10-32)")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(f"denoiser.model={model}: no such folder, and not a hub id "
                          "(<owner>/<name>, e.g. google/ddpm-cifar10-32)")
    return model, "unet", "scheduler"


def _from_pretrained(cls, where: str, subfolder: str | None, what: str, local: bool):
    """(cls.from_pretrained, the configuration file as written), a hub pipeline's subfolder first
    and the model's own layout after; any failure is one ConfigError saying what to do. A
    scheduler is built from its file's configuration (its ᾱ_t), whichever scheduler wrote it."""
    tries = [subfolder] if local else [subfolder, None]
    errors = []
    for sub in dict.fromkeys(tries):
        try:
            kwargs: dict[str, Any] = {"subfolder": sub} if sub else {}
            raw = dict(cls.load_config(where, **kwargs))
            if cls.__name__.endswith("Scheduler"):
                return cls.from_config(raw), raw
            return cls.from_pretrained(where, low_cpu_mem_usage=False, **kwargs), raw
        except Exception as e:  # noqa: BLE001 - no network, no such repo, a broken folder
            text = " ".join(str(e).split())[:240]
            errors.append(f"{f'{sub}/: ' if sub else ''}{type(e).__name__}: {text}")
    where_hint = ("where there is internet, or download it (huggingface-cli download "
                  f"{where} --local-dir <folder>) and pass denoiser.model=<folder>") if not local \
        else "check the folder (diffusers' save_pretrained layout)"
    raise ConfigError(f"denoiser.model={where}: cannot load its {what} ({'; '.join(errors)}). "
                      f"The model is read by diffusers {where_hint}") from None


def load_diffusion(model: str, sigma: float) -> tuple[DiffusionDenoiser, dict]:
    """(the one-step denoiser of a pretrained DDPM for noise level σ, its description for the
    recipe: the UNet's and the scheduler's configuration, t*, ᾱ_t*, the prediction type). `model`:
    a hub id (downloaded and cached by diffusers) or a folder in save_pretrained layout."""
    diffusers = _diffusers()
    if not model:
        raise ConfigError("denoiser.model is not set: a hub id (google/ddpm-cifar10-32) or a folder "
                          "in diffusers' save_pretrained layout")
    where, unet_sub, sched_sub = _layout(str(model))
    local = Path(where).is_dir()
    unet, unet_file = _from_pretrained(diffusers.UNet2DModel, where, unet_sub,
                                       "UNet (UNet2DModel)", local)
    sched, sched_file = _from_pretrained(diffusers.DDPMScheduler, where, sched_sub, "scheduler",
                                         local)
    cfg = dict(unet.config)
    if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
        raise ConfigError(f"denoiser.model={model} is class-conditional (it needs class labels): "
                          "denoised smoothing needs an unconditional model")
    # a variance-preserving model (x_t = √ᾱ x₀ + √(1 − ᾱ) ε): its schedule is a β schedule; a
    # variance-exploding one (score SDE: sigma_min/sigma_max, Fourier time embedding) is another
    # process, which this one-step estimate does not invert
    betas = {"beta_schedule", "trained_betas", "beta_start", "beta_end"} & set(sched_file)
    if not betas or cfg.get("time_embedding_type") == "fourier":
        kind = sched_file.get("_class_name") or "its scheduler"
        raise ConfigError(f"denoiser.model={model}: {kind} has no β schedule (a variance-exploding "
                          "or score-SDE model?): denoiser=diffusion takes variance-preserving "
                          "DDPMs (a DDPM, DDIM or PNDM scheduler with a β schedule)")
    ptype = str(sched.config.get("prediction_type", "epsilon"))
    variance = str(sched.config.get("variance_type") or "fixed_small")
    learned = variance.startswith("learned")
    out_ch, in_ch = int(cfg.get("out_channels", 0)), int(cfg.get("in_channels", 0))
    if out_ch != in_ch * (2 if learned else 1):
        raise ConfigError(f"denoiser.model={model}: the UNet maps {in_ch} channels to {out_ch} with "
                          f"variance_type={variance}: expected {in_ch * (2 if learned else 1)}")
    den = DiffusionDenoiser(unet, sched.alphas_cumprod, sigma, ptype, learned_variance=learned)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "variance_type", "rescale_betas_zero_snr")
    # the configuration files as written (not the installed diffusers' defaults on top, which a
    # diffusers upgrade may extend): the recipe, and the identity, stay the model's own
    info = json.loads(json.dumps({  # plain lists and numbers: the recipe goes into configs and JSON
        "unet": {k: v for k, v in unet_file.items() if not str(k).startswith("_")},
        "scheduler": {k: sched_file[k] for k in keep if k in sched_file},
        "sigma": float(sigma), "timestep": den.timestep, "alpha_bar": den.alpha_bar,
        "prediction_type": ptype, "noise_mismatch": den.noise_mismatch,
        "sample_size": cfg.get("sample_size"),
    }, default=str))
    return den, info
