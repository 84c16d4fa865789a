"""The Monte Carlo engine: chunking, counting, seeding, stages, certify/predict plumbing."""
from functools import partial

import numpy as np
import pytest
import torch
from scipy.stats import norm

from dsr_lightning.errors import NetworkError
from dsr_lightning.smoothing import ABSTAIN, ImageNoise
from dsr_lightning.smoothing import SmoothedClassifier as _Smoothed
from dsr_lightning.smoothing import sample_counts as _sample_counts

# These tests drive the engine with abstract inputs (pixel values 0, 100, 200, ... that name the
# image), outside the [0, 1] the entry points require; the range check has its own tests.
SmoothedClassifier = partial(_Smoothed, allow_out_of_range=True)
sample_counts = partial(_sample_counts, allow_out_of_range=True)

K = 3  # real classes; label 3 = reject


class Recorder(torch.nn.Module):
    """Keeps every chunk it sees. Image i is the constant 100·i, so the image a sample came from
    is round(mean/100); the label mixes that image id with the sign of one noise pixel."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.chunks = K, []

    @staticmethod
    def label(z):  # (b, C, H, W) -> (b,)
        img = torch.round(z.mean((1, 2, 3)) / 100)
        return ((img + (z[:, 0, 0, 0] > 100 * img)) % (K + 1)).long()

    def forward(self, z):
        self.chunks.append(z.clone())
        return self.label(z)


class Constant(torch.nn.Module):
    def __init__(self, label, num_classes=K):
        super().__init__()
        self.label, self.num_classes = label, num_classes

    def forward(self, z):
        return torch.full((len(z),), self.label, dtype=torch.long, device=z.device)


def images(B, shape=(3, 4, 4)):
    return 100 * torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, *shape)


def test_counts_land_in_the_right_image_across_unaligned_chunks():
    B, n, bs, sigma = 7, 37, 50, 0.3  # chunks of 50 cut through images of 37 draws
    base = Recorder()
    counts = sample_counts(base, images(B), n, sigma, bs, generator=torch.Generator().manual_seed(0))
    assert counts.shape == (B, K + 1) and counts.dtype == torch.long and counts.device.type == "cpu"
    assert (counts.sum(1) == n).all()
    z = torch.cat(base.chunks)  # (B·n, C, H, W) in stream order
    assert len(z) == B * n and max(len(c) for c in base.chunks) == bs
    img = torch.round(z.mean((1, 2, 3)) / 100).long()
    assert (img == torch.arange(B).repeat_interleave(n)).all()  # image i owns draws i·n..(i+1)·n-1
    assert any(len(set(torch.round(c.mean((1, 2, 3)) / 100).tolist())) > 1 for c in base.chunks)
    # naive per-image loop over the same draws, counted with numpy
    labels = Recorder.label(z).numpy().reshape(B, n)
    naive = np.stack([np.bincount(row, minlength=K + 1) for row in labels])
    np.testing.assert_array_equal(counts.numpy(), naive)
    assert len(np.unique(naive.argmax(1))) > 1  # labels differ between images: a real check
    # the noise: N(0, σ²) per pixel, fresh for every draw
    eps = (z - 100 * img.view(-1, 1, 1, 1)).flatten(1)  # (B·n, C·H·W)
    assert abs(eps.std().item() / sigma - 1) < 0.02 and abs(eps.mean().item()) < 0.01
    assert len(torch.unique(eps, dim=0)) == len(eps)  # no draw repeats another


def test_stages_are_consecutive_fresh_draws():
    B, stages = 5, (4, 23)
    base = Recorder()
    counts = sample_counts(base, images(B), stages, 0.3, 16, generator=torch.Generator().manual_seed(1))
    assert counts.shape == (B, 2, K + 1)
    assert (counts.sum(-1) == torch.tensor(stages)).all()
    labels = Recorder.label(torch.cat(base.chunks)).numpy().reshape(B, sum(stages))
    for s, part in enumerate(np.split(labels, [stages[0]], axis=1)):
        naive = np.stack([np.bincount(row, minlength=K + 1) for row in part])
        np.testing.assert_array_equal(counts[:, s].numpy(), naive)


class Coin(torch.nn.Module):
    """Label from the sign of the first noisy pixel and of the pixel mean: 4 equally likely."""
    num_classes = K

    def forward(self, z):
        return ((z[:, 0, 0, 0] > 0).long() + 2 * (z.mean((1, 2, 3)) > 0).long())


def test_same_seed_same_counts():
    x = torch.zeros(6, 3, 4, 4)

    def run(seed, bs=64):
        return sample_counts(Coin(), x, 200, 0.5, bs, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a.float() / 200 - 0.25).abs() < 0.15).all()  # all four labels occur


@pytest.mark.parametrize("shape", [(3, 4, 4), (3,)])  # (3,): rows end inside a 64-bit word
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_block_is_drawn_as_far_as_it_is_used_with_the_same_draws(dtype, shape):
    """On the CPU a block is drawn only as far as it is used, and drawn on where it stopped: draws
    0..k-1 of an image are the first k rows of its whole 256-draw block, whatever k, however the
    draws are asked for, and with other images' draws asked for in between."""
    whole = ImageNoise(7, [3, 11]).draw(1, 0, 512, shape, "cpu", dtype)
    other = ImageNoise(7, [3, 11]).draw(0, 0, 512, shape, "cpu", dtype)
    assert not torch.equal(other, whole)
    for k in (1, 100, 255, 256, 300):
        assert torch.equal(ImageNoise(7, [3, 11]).draw(1, 0, k, shape, "cpu", dtype), whole[:k])
    noise = ImageNoise(7, [3, 11])  # the N0 draws, then the N draws after them in pieces
    pieces = [noise.draw(1, a, b, shape, "cpu", dtype)
              for a, b in ((0, 100), (100, 101), (101, 130), (130, 400), (400, 512))]
    assert torch.equal(torch.cat(pieces), whole)
    noise, got = ImageNoise(7, [3, 11]), {0: [], 1: []}  # two images in turns
    for a, b in ((0, 50), (50, 70), (70, 300), (300, 512)):
        for i in (1, 0):
            got[i].append(noise.draw(i, a, b, shape, "cpu", dtype))
    assert torch.equal(torch.cat(got[1]), whole) and torch.equal(torch.cat(got[0]), other)


def test_certify_fields_and_exact_radius():
    B, n0, n, alpha, sigma = 4, 10, 500, 0.01, 0.5
    smoothed = SmoothedClassifier(Constant(2), sigma=sigma)
    cert = smoothed.certify(images(B), n0, n, alpha, batch_size=333, bound="paper")
    np.testing.assert_array_equal(cert.prediction, 2)
    # n_A = N: ρ = σ/2·2Φ⁻¹(CP_lower(N, N, α/2)) = σΦ⁻¹((α/2)^(1/N))
    np.testing.assert_allclose(cert.radius, sigma * norm.ppf((alpha / 2) ** (1 / n)), rtol=1e-9)
    np.testing.assert_array_equal(cert.counts0[:, 2], n0)
    np.testing.assert_array_equal(cert.counts[:, 2], n)
    np.testing.assert_array_equal(cert.N, n)
    assert cert.bound == "paper" and cert.sigma == sigma and cert.columns()["n_A"].shape == (B,)


def test_all_rejected_abstains_with_a_real_c_hat():
    cert = SmoothedClassifier(Constant(K), sigma=0.25).certify(images(3), 20, 100, 0.01, 64)
    np.testing.assert_array_equal(cert.c_hat, 0)  # tie over the real classes: lowest index
    np.testing.assert_array_equal(cert.prediction, ABSTAIN)
    np.testing.assert_array_equal(cert.radius, 0.0)
    np.testing.assert_array_equal(cert.n_R, 100)


def test_predict():
    x = torch.zeros(8, 3, 4, 4)
    assert (SmoothedClassifier(Constant(1), sigma=0.25).predict(x, 100, 0.01, 64) == 1).all()
    pred = SmoothedClassifier(Coin(), sigma=0.25).predict(x, 400, 0.001, 64,
                                                          generator=torch.Generator().manual_seed(5))
    assert (pred == ABSTAIN).mean() >= 0.75  # four equally likely labels


def test_no_images():
    counts = sample_counts(Constant(0), torch.zeros(0, 3, 4, 4), 10, 0.1, 8)
    assert counts.shape == (0, K + 1)
    cert = SmoothedClassifier(Constant(0), sigma=0.1).certify(torch.zeros(0, 3, 4, 4), 5, 10, 0.1, 8)
    assert cert.prediction.shape == (0,) and cert.radius.shape == (0,)


@pytest.mark.parametrize("call, match", [
    (lambda s, x: s.certify(x, 10, 100, 0.0, 32), "alpha"),
    (lambda s, x: s.certify(x, 10, 100, 1.5, 32), "alpha"),
    (lambda s, x: s.certify(x, 0, 100, 0.01, 32), "n0"),
    (lambda s, x: s.certify(x, 10, 0, 0.01, 32), "n must"),
    (lambda s, x: s.certify(x, 10, 100, 0.01, 0), "batch_size"),
    (lambda s, x: s.certify(x, 10, 100, 0.01, 32, bound="holm"), "paper, runner_up, cohen"),
    (lambda s, x: s.certify(x.long(), 10, 100, 0.01, 32), "floating point"),
    (lambda s, x: s.predict(x, 10, 0.0, 32), "alpha"),
    (lambda s, x: s.predict(x, 10.5, 0.01, 32), "n must"),
    (lambda s, x: SmoothedClassifier(Constant(0), sigma=0.0), "sigma"),
    (lambda s, x: SmoothedClassifier(lambda z: z[:, 0, 0, 0].long(), sigma=0.1), "num_classes"),
    (lambda s, x: sample_counts(s.base, x, (), 0.1, 8), "stage"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(SmoothedClassifier(Constant(0), sigma=0.25), torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("label", [K + 1, -1])
def test_labels_out_of_range_are_caught(label):
    """A base giving no label (SmoothingSystem's INVALID for non-finite logits, or anything out of
    0..K) is one NetworkError at the sync, never a count of some class."""
    with pytest.raises(NetworkError, match=r"gave 30 of 30 noisy samples no label in 0..3"):
        sample_counts(Constant(label), torch.zeros(3, 3, 4, 4), 10, 0.1, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_and_counts():
    x = images(5).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = Recorder()
    counts = sample_counts(base, x, 301, 0.3, 256, generator=gen)
    assert counts.device.type == "cpu" and (counts.sum(1) == 301).all()
    labels = Recorder.label(torch.cat(base.chunks)).cpu().numpy().reshape(5, 301)
    naive = np.stack([np.bincount(row, minlength=K + 1) for row in labels])
    np.testing.assert_array_equal(counts.numpy(), naive)
    again = sample_counts(Recorder(), x, 301, 0.3, 256,
                          generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(counts, again)
