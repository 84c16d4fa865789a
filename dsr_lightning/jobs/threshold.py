"""`rejector.threshold=auto` in a run: the threshold chosen once after fit for each checkpoint the
run keeps (best, last), on the validation split, and written into that checkpoint; and the
diagnosis CLI `dsr-threshold CKPT` (the table behind the choice). The statistics
are smoothing.threshold (DESIGN §5).

Only the validation split (held out of the training split) is read, never the test split: the
chosen t is a fixed part of f_R before any test image is drawn, so the certificates stay sound.
"""

from __future__ import annotations

import numpy as np
import torch

from dsr_lightning.jobs.run_checkpoint import RunCheckpoint
from dsr_lightning.logs import console, get_logger
from dsr_lightning.models import SmoothingSystem
from dsr_lightning.smoothing import choose_threshold, collect_draws
from dsr_lightning.smoothing.threshold import estimate

log = get_logger(__name__)


def select(system: SmoothingSystem, val, settings: dict, device) -> dict:
    """The threshold for f_R's current weights, on validation draws. settings: images, draws,
    batch, N, alpha, bound, objective, radius, sigma, seed, bf16 (selection_settings: the draws
    in bf16 autocast when certification uses it, so the threshold is chosen on the logits it is
    applied to)."""
    rej = system.rejector
    mode = rej.training
    rej.eval()
    # the logits as certification computes them (certify.bf16): the threshold applies to those
    bf16 = bool(settings.get("bf16")) and torch.device(device).type in ("cuda", "cpu")
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            draws = collect_draws(system, val, settings["images"], settings["draws"],
                                  settings["sigma"], settings["batch"], settings["seed"], device)
    finally:
        rej.train(mode)
    choice = choose_threshold(draws, system.num_classes, settings["sigma"], settings["N"],
                              settings["alpha"], settings["bound"], settings["objective"],
                              settings["radius"])
    return {**choice, "split": "val", "images": int(draws["pred"].shape[0]),
            "draws": int(draws["pred"].shape[1]), "N": settings["N"], "alpha": settings["alpha"],
            "bound": settings["bound"]}


def selection_settings(cfg) -> dict | None:
    """What select needs, from a train config; None unless rejector.threshold=auto."""
    rej = cfg.rejector
    if rej.threshold != "auto":
        return None
    sel = rej.selection
    return {"images": int(sel.images), "draws": int(sel.draws), "batch": int(sel.batch),
            "N": int(sel.N if sel.N is not None else cfg.certify.N),
            "alpha": float(sel.alpha if sel.alpha is not None else cfg.certify.alpha),
            "bound": cfg.certify.bound or "paper", "objective": sel.objective,
            "radius": float(sel.radius), "sigma": float(cfg.sigma), "seed": int(cfg.seed),
            "bf16": bool(cfg.certify.bf16)}


def choose_for_checkpoints(task, val, settings: dict, paths) -> dict | None:
    """After fit: the threshold for each checkpoint the run keeps (best, last), chosen once per
    distinct weights (a file that already carries the choice for its step keeps it) and written
    into the file. The task's weights are those of the last file handled. Returns the choice of
    the first path (the one certified)."""
    device = next(task.parameters()).device
    done: dict[int, dict] = {}
    first = None
    for path in dict.fromkeys(p for p in paths if p):  # best first; each file once
        ckpt = RunCheckpoint.read(path)
        choice = ckpt.threshold_choice
        if not choice or choice.get("global_step") != ckpt.global_step:
            choice = done.get(ckpt.global_step)
            if choice is None:
                ckpt.load_into(task)
                system = SmoothingSystem(task.classifier, task.denoiser, task.rejector)
                choice = {**select(system, val, settings, device),
                          "epoch": ckpt.epoch - 1, "global_step": ckpt.global_step}
            ckpt.write_threshold(choice)
        done[ckpt.global_step] = choice
        first = first or choice
    return first


def describe(choice: dict) -> str:
    """One line on a threshold choice."""
    return (f"auto: {choice['objective']} {choice['score']:.4f} on {choice['images']} validation "
            f"images x {choice['draws']} draws at N={choice['N']} (never rejecting: "
            f"{choice['score_never_reject']:.4f}); rejects {100 * choice['reject_rate']:.1f} % of "
            f"draws, {100 * choice['reject_rate_f_right']:.1f} % of those f gets right, "
            f"{100 * choice['reject_rate_f_wrong']:.1f} % of those it gets wrong")


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be an integer >= 1")
    return value


def _alpha(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be in (0, 1) (the failure probability "
                                         "of each certificate, e.g. 0.01)")
    return value


def main(argv: list[str] | None = None) -> int:
    """`dsr-threshold CKPT`: how f_R's certification moves with the threshold,
    on the validation draws of a rejector checkpoint (the diagnosis behind threshold=auto)."""
    with console():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    import argparse

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dsr_lightning.errors import USER_ERRORS

    p = argparse.ArgumentParser(prog="dsr-threshold", description=main.__doc__)
    p.add_argument("ckpt", help="a rejector checkpoint of dsr-train")
    p.add_argument("--images", type=_positive_int, default=200, help="validation images")
    p.add_argument("--draws", type=_positive_int, default=100, help="noise draws per image")
    p.add_argument("--N", type=_positive_int, default=None, help="default: the run's certify.N")
    p.add_argument("--alpha", type=_alpha, default=None, help="default: the run's certify.alpha")
    p.add_argument("--batch", type=_positive_int, default=512, help="samples per forward pass")
    args = p.parse_args(argv)
    try:
        ckpt = RunCheckpoint.read(args.ckpt)
        system = ckpt.rejection_system(threshold=0.0)  # the logits are recorded, not the labels
        chosen = ckpt.threshold() if ckpt.threshold_choice or \
            ckpt.config["rejector"].get("threshold") != "auto" else None
        run = ckpt.config
        val = instantiate(OmegaConf.create(run["data"])).dataset("val")
        sigma, seed = float(run["sigma"]), int(run["seed"])
        N = args.N if args.N is not None else int(run["certify"]["N"])
        alpha = args.alpha if args.alpha is not None else float(run["certify"]["alpha"])
        draws = collect_draws(system, val, args.images, args.draws, sigma, args.batch, seed, "cpu")
        xs = torch.stack([val[i][0] for i in range(draws["pred"].shape[0])])
        with torch.inference_mode():
            clean = system.classifier(xs).argmax(1).numpy()          # f(x), the paper's target
    except USER_ERRORS as e:
        log.error(f"error: {e}")
        return 2
    K = system.num_classes
    right = draws["pred"] == draws["label"][:, None]
    target = draws["pred"] != clean[:, None]
    log.info(f"{args.ckpt}: sigma={sigma:g}, {draws['pred'].shape[0]} validation images x "
          f"{args.draws} draws; estimates at N={N}, alpha={alpha:g}, bound=paper\n"
          f"f(D(x+e)) right on {100 * right.mean():.1f} % of draws; target b = 1[f(D(x+e)) != f(x)] "
          f"on {100 * target.mean():.1f} %; the checkpoint's threshold: {chosen}\n")
    ts = sorted(set(np.quantile(draws["logit"], np.linspace(0, 1, 11)[1:-1]).round(3).tolist())
                | {0.0, np.inf} | ({chosen} if chosen is not None else set()))
    log.info("| threshold | reject % | reject % (f right) | reject % (f wrong) | mean p_A | "
             "mean p_A+p_R | est. ACR | est. acc r=0 |\n|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pct(mask) -> str:
        return f"{100 * mask.mean():.1f}" if mask.size else "–"

    for t in ts:
        e = estimate(draws, t, K, sigma, N, alpha)
        rej = draws["logit"] > t
        mark = " (chosen)" if chosen is not None and t == chosen else ""
        log.info(f"| {t:.3g}{mark} | {pct(rej)} | {pct(rej[right])} | {pct(rej[~right])} | "
                 f"{e['pA']:.3f} | {e['pAR']:.3f} | {e['acr']:.3f} | {100 * e['accuracy']:.1f} |")
    return 0
