"""mode=attack (DESIGN §13): PGD on the smoothed classifier (SmoothAdv) within the ε ball, on tiny
in-memory systems (a logistic model, a 1x1-conv denoiser, a linear rejector): it lowers the true
class's smoothed probability, stays in the ball and in [0, 1], gives the frozen networks no
gradient; an abstaining attacked point is reported as such; the results file resumes; the config
refuses a missing ε and bad attack settings; the report's soundness alarm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import compose_tiny
from hydra.core.hydra_config import HydraConfig
from test_certify import certify_tiny
from torch import nn

from dsr_lightning.config.schema import check_certify
from dsr_lightning.errors import ConfigError, ResultsError
from dsr_lightning.models import SmoothingSystem
from dsr_lightning.reports.attack import attack_summary, main
from dsr_lightning.results import ATTACK_COLUMNS, CERTIFY_COLUMNS, REFERENCE_COLUMNS
from dsr_lightning.smoothing import ATTACK_KEY_OFFSET, attack_noise, pgd_attack, smoothed_true_prob
from dsr_lightning.tasks import CertificationModule, CertificationSpec

SHAPE = (3, 4, 4)
SIGMA = 0.25


class Logistic(nn.Module):
    """2 classes on 3x4x4 images: logits (s, −s), s = w·(x − 1/2) + b; stage features [x]."""

    num_classes = 2

    def __init__(self, w: torch.Tensor, b: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(w.reshape(-1).clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward_features(self, x):
        s = (x - 0.5).flatten(1) @ self.w + self.b  # (B,)
        return torch.stack([s, -s], 1), [x]

    def forward(self, x):
        return self.forward_features(x)[0]


class LinearRejector(nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(int(np.prod(SHAPE)), 2)

    def forward(self, z, feats):
        return self.lin(z.flatten(1))


def systems(seed: int = 0) -> dict[str, SmoothingSystem]:
    """The logistic model alone, and with a near-identity denoiser and a linear rejector; the
    parameters require grad (the test shows the attack gives them none anyway)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE, generator=g) * 0.5
    den = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        den.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 0.9 + 0.01)
        den.bias.fill_(0.02)
    rej = LinearRejector()
    with torch.no_grad():
        rej.lin.weight.copy_(torch.randn(rej.lin.weight.shape, generator=g) * 0.3)
        rej.lin.bias.zero_()
    return {"plain": SmoothingSystem(Logistic(w, b=0.5)).eval(),
            "rejection": SmoothingSystem(Logistic(w, b=0.5), den, rej, threshold=0.5).eval()}


def images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g)
    x[:, 0, 0] = 0.0  # pixels on the edges of [0, 1]: the projection must keep them inside
    x[:, 1, 0] = 1.0
    return x


@pytest.mark.parametrize("name", ["plain", "rejection"])
def test_attack_lowers_the_true_class(name):
    system = systems()[name]
    x, y, eps = images(6), torch.zeros(6, dtype=torch.long), 0.5
    adv = pgd_attack(system.soft_scores, x, y, SIGMA, eps, steps=10, draws=32,
                     noise=attack_noise(0, range(6)))
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-6).all() and (norms > 0.1).all()
    assert adv.min() >= 0 and adv.max() <= 1
    # the keep-weighted smoothed probability of the true class, on the same 4000 draws
    before = smoothed_true_prob(system.soft_scores, x, y, SIGMA, 4000,
                                torch.Generator().manual_seed(7))
    after = smoothed_true_prob(system.soft_scores, adv, y, SIGMA, 4000,
                               torch.Generator().manual_seed(7))
    assert (after < before - 0.02).all(), (before, after)
    # a random direction of the same length does much less
    g = torch.Generator().manual_seed(3)
    d = torch.randn(x.shape, generator=g)
    rnd = (x + d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps).clamp(0, 1)
    assert (smoothed_true_prob(system.soft_scores, rnd, y, SIGMA, 4000,
                               torch.Generator().manual_seed(7)) > after).all()


def test_attack_is_deterministic_and_its_noise_is_its_own():
    system = systems()["rejection"]
    x, y = images(3), torch.zeros(3, dtype=torch.long)
    a = pgd_attack(system.soft_scores, x, y, SIGMA, 0.3, 3, 8, noise=attack_noise(5, [0, 1, 2]))
    b = pgd_attack(system.soft_scores, x[1:], y[1:], SIGMA, 0.3, 3, 8,
                   noise=attack_noise(5, [1, 2]), images_per_pass=1)  # batched otherwise
    torch.testing.assert_close(a[1:], b)
    assert attack_noise(5, [3]).keys == [3 + ATTACK_KEY_OFFSET]


def test_networks_get_no_gradient_and_the_rejector_is_differentiable():
    system = systems()["rejection"]
    params = list(system.parameters())
    assert params and all(p.requires_grad for p in params)
    x, y = images(2), torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():  # as in Lightning's predict loop
        adv = pgd_attack(system.soft_scores, x, y, SIGMA, 0.3, 3, 8, noise=attack_noise(0, [0, 1]))
    assert not torch.equal(adv, x)
    assert all(p.grad is None for p in params)
    # the keep weight reaches the input through D and the rejector
    noisy = x.clone().requires_grad_(True)
    probs, keep = system.soft_scores(noisy)
    (g,) = torch.autograd.grad(keep.sum(), [noisy])
    assert g.abs().sum() > 0 and all(p.grad is None for p in params)
    # soft_scores agrees with the hard f_R of outputs() (unchanged)
    out = system.outputs(noisy.detach())
    label = torch.where(keep < 0.5, torch.full_like(out["pred"], 2), probs.argmax(1))
    assert torch.equal(label, out["label"]) and not out["logits"].requires_grad


def spec(**kw) -> CertificationSpec:
    base = dict(mode="attack", sigma=SIGMA, N0=5, N=5, alpha=0.01, bound="cohen", seed=0,
                batch=64, images_per_step=2, radius=0.2, attack_steps=2, attack_draws=4,
                attack_step_size=0.2)
    return CertificationSpec(**{**base, **kw})


def step(system, s: CertificationSpec, x, y) -> pd.DataFrame:
    module = CertificationModule(system, s, dataset=None, todo=[])
    module.eval()
    idx = torch.arange(len(x))
    with torch.inference_mode():
        rows = module.predict_step((idx, x, y), 0)
    df = pd.DataFrame(rows)
    assert set(df.columns) == set(ATTACK_COLUMNS)
    return df


def test_abstaining_attacked_point_is_reported_as_abstain():
    """A 50/50 classifier (one pixel at 1/2 decides) and N = 5 (Algorithm 1 cannot answer at
    α = 0.01 with 5 draws): every prediction abstains, attacked_correct is 0."""
    w = torch.zeros(SHAPE)
    w[0, 2, 2] = 50.0
    x = torch.full((2, *SHAPE), 0.5)
    df = step(SmoothingSystem(Logistic(w)).eval(), spec(), x, torch.tensor([0, 1]))
    assert (df.attacked_predict == -1).all() and (df.attacked_correct == 0).all()
    assert (df.clean_predict == -1).all() and (df.predict == -1).all() and (df.radius == 0).all()
    assert (df.perturbation_norm <= 0.2 + 1e-6).all() and (df.epsilon == 0.2).all()


def test_confident_rows():
    """A confident classifier: the certificate, both predictions and attacked_correct agree."""
    w = torch.zeros(SHAPE)
    w[0, 2, 2] = 50.0
    x = torch.full((2, *SHAPE), 0.9)  # class 0 on nearly every draw
    df = step(SmoothingSystem(Logistic(w)).eval(), spec(N0=20, N=100), x, torch.tensor([0, 1]))
    assert (df.clean_predict == 0).all() and (df.attacked_predict == 0).all()
    assert (df.predict == 0).all() and (df.radius > 0).all()
    assert df.correct.tolist() == [1, 0] and df.attacked_correct.tolist() == [1, 0]


def test_attack_file_resumes(tiny_pretrained, tmp_path):
    args = ["system=plain", "mode=attack", "radius=0.25", "attack_steps=2", "attack_draws=4",
            "N0=10", "N=20", "images_per_step=1"]
    first = certify_tiny(tiny_pretrained, None, tmp_path, *args, "max=2")
    path = Path(first["outfile"])
    assert path.name.endswith("_cohen_attack_eps0.25_k2_m4.tsv") and first["todo"] == 2
    rows = path.read_text().split("\n")
    assert rows[0].split("\t") == ATTACK_COLUMNS and ATTACK_COLUMNS[:6] == REFERENCE_COLUMNS
    rec = json.loads(Path(f"{path}.json").read_text())
    assert {k: rec[k] for k in ("mode", "radius", "attack_steps", "attack_draws",
                                "attack_step_size")} == {
        "mode": "attack", "radius": 0.25, "attack_steps": 2, "attack_draws": 4,
        "attack_step_size": 2.5 * 0.25 / 2}
    again = certify_tiny(tiny_pretrained, None, tmp_path, *args, "max=3")
    assert again["outfile"] == str(path) and again["done_before"] == 2 and again["todo"] == 1
    final = path.read_text().split("\n")
    assert final[:3] == rows[:3] and len(final) == 5 and final[-1] == ""
    df = pd.read_csv(path, sep="\t")
    assert df.idx.tolist() == [0, 1, 2] and (df.perturbation_norm <= 0.25 + 1e-6).all()
    assert (df.epsilon == 0.25).all() and (df.perturbation_norm > 0).all()
    assert ((df.attacked_predict == -1) <= (df.attacked_correct == 0)).all()
    assert again["attack"]["images"] == 3 and again["attack"]["epsilon"] == 0.25
    # another attack is another identity: refused on the same file
    with pytest.raises(ResultsError, match="attack_steps: file 2"):
        certify_tiny(tiny_pretrained, None, tmp_path, *args, "attack_steps=3", f"outfile={path}")


@pytest.mark.parametrize("overrides,message", [
    (["mode=attack"], "mode=attack attacks within an L2 ball: set radius=<ε>"),
    (["mode=attack", "radius=0"], "radius=0.0: must be a finite number > 0"),
    (["mode=attack", "radius=0.25", "attack_steps=0"], "attack_steps=0: must be an integer >= 1"),
    (["mode=attack", "radius=0.25", "attack_draws=0"], "attack_draws=0: must be an integer >= 1"),
    (["mode=attack", "radius=0.25", "attack_step_size=-1"], "attack_step_size=-1.0"),
])
def test_config_refuses(tmp_path, overrides, message):
    cfg = compose_tiny(tmp_path, ["system=plain", *overrides], name="certify")
    try:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_certify(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_attack_types_are_refused_when_composing():
    from hydra.errors import ConfigCompositionException

    from dsr_lightning.config import compose

    with pytest.raises(ConfigCompositionException):
        compose("certify", ["attack_steps=two"])


def frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=ATTACK_COLUMNS)


def test_attack_summary_and_cli(tmp_path, capsys):
    # idx label predict radius correct time clean attacked attacked_correct norm eps
    df = frame([[0, 1, 1, 0.5, 1, 0.1, 1, 1, 1, 0.25, 0.25],    # certified, survives
                [1, 2, 2, 0.3, 1, 0.1, 2, 3, 0, 0.25, 0.25],    # certified, flipped: alarm
                [2, 0, 0, 0.3, 1, 0.1, 0, -1, 0, 0.25, 0.25],   # certified, abstains: no alarm
                [3, 0, 0, 0.1, 1, 0.1, 0, 4, 0, 0.25, 0.25],    # below ε: no alarm
                [4, 5, -1, 0.0, 0, 0.1, -1, 5, 1, 0.25, 0.25]])  # abstained: no alarm
    s = attack_summary(df, {"mode": "attack", "radius": 0.25})
    assert s["alarms"] == [1] and s["certified"] == 3 and s["images"] == 5
    assert s["empirical_robust_accuracy"] == pytest.approx(0.4)
    assert s["certified_accuracy"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="not a mode=attack"):
        attack_summary(df, {"mode": "certify"})

    path = tmp_path / "a.tsv"
    path.write_text("\t".join(ATTACK_COLUMNS) + "\n" + "".join(
        "\t".join(map(str, r)) + "\n" for r in df.itertuples(index=False)))
    Path(f"{path}.json").write_text(json.dumps({"mode": "attack", "radius": 0.25}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "epsilon=0.25" in out and "ALARM" in out and "idx 1" in out

    other = tmp_path / "c.tsv"
    other.write_text("\t".join(CERTIFY_COLUMNS) + "\n")
    Path(f"{other}.json").write_text(json.dumps({"mode": "certify"}))
    assert main([str(other)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "mode=attack" in err[0]
