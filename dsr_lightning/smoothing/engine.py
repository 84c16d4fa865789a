"""The Monte Carlo engine: noise on the input's device, large chunks that mix images, counting on
the device, one host sync per call. `base(noisy) -> labels` is any callable returning a LongTensor
of labels in {0..K}, K = reject (e.g. models.SmoothingSystem); it is called as is, so put it in
eval mode. sigma is the noise std in pixel units of [0,1] images.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dsr_lightning.errors import DataError, NetworkError

from .certificates import CertifyDetails, certify_details, predict_counts
from .checks import check_alpha, check_bound, check_positive, check_positive_int

Base = Callable[[torch.Tensor], torch.Tensor]


def _num_classes(base: Base, num_classes: int | None) -> int:
    if num_classes is None:
        num_classes = getattr(base, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes: not given and base has no .num_classes")
    return check_positive_int("num_classes", num_classes)


NOISE_BLOCK = 256  # draws per seeded block of ImageNoise
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _block_seed(seed: int, key: int, block: int) -> int:
    """A 63-bit generator seed for block `block` of image `key` under `seed` (CUDA's Philox
    generator takes all of it)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, key, block), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def noise_scheme(device_type: str) -> str:
    """The name of the noise streams on a device (results files record it: a file is only
    extended under the same streams). CUDA: torch's Philox seeded from a 63-bit hash of
    (seed, image, block); elsewhere: NumPy's Philox4x64 with the key `seed` and the counter
    (0, 0, block, image), distinct for every (seed, image, block) by construction (torch's CPU
    generator keeps only 32 bits of a seed, so hashed seeds could repeat blocks there)."""
    if device_type == "cuda":
        return f"image-blocks/{NOISE_BLOCK}/v1"
    return f"image-blocks/{NOISE_BLOCK}/philox-v2"


class ImageNoise:
    """Counter-based noise, one stream per image: draw k of image b is row k mod G of block
    k // G (G = `block`), a function of (seed, keys[b], k // G) alone (noise_scheme). An image's
    draws therefore depend on its key (e.g. its index in the data set) and the seed only, not on
    the images it is certified with, the chunk size, a shard, or where a killed run resumed.
    `pos[b]` counts the draws image b has taken; sample_counts advances it. Seeds and keys are
    integers in [0, 2**63)."""

    def __init__(self, seed: int, keys: Sequence[int], block: int = NOISE_BLOCK):
        self.seed, self.keys = int(seed), [int(k) for k in keys]
        if self.seed < 0 or any(k < 0 for k in self.keys):
            raise ValueError("ImageNoise: seed and keys must be integers >= 0")
        self.block = check_positive_int("block", block)
        self.pos = np.zeros(len(self.keys), dtype=np.int64)
        self._gens: dict[str, torch.Generator] = {}
        self._philox: np.random.Philox | None = None
        self._last: tuple | None = None  # (key, block index, device, dtype, shape) -> rows

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: Sequence[int]) -> ImageNoise:
        """The streams of images `idx`, continuing where they are (the positions are copied)."""
        sub = ImageNoise(self.seed, [self.keys[i] for i in idx], self.block)
        sub.pos = self.pos[np.asarray(idx, dtype=np.int64)].copy()
        return sub

    def _philox_rows(self, key: int, j: int, rows: int, shape, np_dtype,
                     have: torch.Tensor | None) -> torch.Tensor:
        """The first `rows` rows of block j of image `key` from Philox4x64 (key = seed, counter
        = (0, 0, j, key)). NumPy fills an array from the stream in order, so the first k rows of
        a block are the same however many are drawn, and drawing on continues the block
        (tests/test_smoothing_engine.py checks both): a block is drawn only as far as it is used
        (N0 = 100 of 256 draws), and `have`, the block's rows drawn last (the generator still
        stands right after them), is extended instead of drawn again."""
        if have is not None:
            more = self._numpy.standard_normal((rows - len(have), *shape), dtype=np_dtype)
            return torch.cat([have, torch.from_numpy(more)])
        if self._philox is None:
            self._philox = np.random.Philox(key=self.seed)
            self._state = self._philox.state
            self._numpy = np.random.Generator(self._philox)
        state = self._state
        counter = state["state"]["counter"]  # (4,) uint64, set in place: (0, 0, j, key)
        counter[0], counter[1], counter[2], counter[3] = 0, 0, j, key
        state["buffer_pos"], state["has_uint32"], state["uinteger"] = 4, 0, 0
        self._philox.state = state
        return torch.from_numpy(self._numpy.standard_normal((rows, *shape), dtype=np_dtype))

    def _rows(self, key: int, j: int, rows: int, shape, device, dtype) -> torch.Tensor:
        """At least the first `rows` rows of block j of image `key`: on the CPU in float32 or
        float64 as far as asked (see _philox_rows), elsewhere the whole block of G rows (CUDA's
        generator gives no prefixes)."""
        tag = (key, j, device, dtype, shape)
        last = self._last
        if last is not None and last[0] == tag and len(last[1]) >= rows:
            return last[1]  # the block a chunk boundary split: drawn once
        if device.type == "cuda":
            gen = self._gens.get(str(device))
            if gen is None:
                gen = self._gens[str(device)] = torch.Generator(device=device)
            gen.manual_seed(_block_seed(self.seed, key, j))
            out = torch.randn((self.block, *shape), generator=gen, device=device, dtype=dtype)
        elif device.type == "cpu" and dtype in _NUMPY_DTYPES:
            have = last[1] if last is not None and last[0] == tag else None
            out = self._philox_rows(key, j, rows, shape, _NUMPY_DTYPES[dtype], have)
        else:  # the float32 block, converted
            out = self._philox_rows(key, j, self.block, shape, np.float32, None)
            out = out.to(device=device, dtype=dtype)
        self._last = (tag, out)
        return out

    def draw(self, b: int, start: int, stop: int, shape, device, dtype) -> torch.Tensor:
        """Draws start..stop-1 of image b: (stop - start, *shape) standard normal."""
        G, key, out = self.block, self.keys[b], []
        shape = tuple(shape)
        device = device if isinstance(device, torch.device) else torch.device(device)
        for j in range(start // G, (stop - 1) // G + 1):
            lo, hi = max(start, j * G) - j * G, min(stop, (j + 1) * G) - j * G
            rows = self._rows(key, j, hi, shape, device, dtype)
            out.append(rows if lo == 0 and hi == len(rows) else rows[lo:hi])
        return out[0] if len(out) == 1 else torch.cat(out)


def check_images(x: torch.Tensor, allow_out_of_range: bool = False, name: str = "x",
                 escape: str | None = "allow_out_of_range=True") -> None:
    """x must be finite, and in [0, 1] unless allowed: σ and the radii are in pixel units of
    [0,1] images, so 0..255 images would get meaningless certificates. One DataError naming the
    images `name` (and `escape`, the setting that allows other ranges, where there is one). One
    host sync."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
        raise DataError(f"{name} must be a floating point tensor (B, *shape)")
    if not x.numel():
        return
    stats = torch.stack([torch.isfinite(x).all().to(x.dtype), x.amin(), x.amax()]).tolist()
    if not stats[0]:
        bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero().flatten().tolist()
        raise DataError(f"{name} holds NaN or Inf values (images at positions {bad[:10]} of the "
                        "batch): drop or repair them")
    if not allow_out_of_range and (stats[1] < 0 or stats[2] > 1):
        allow = f", or allow other ranges explicitly ({escape})" if escape else ""
        raise DataError(f"{name} has values in [{stats[1]:.4g}, {stats[2]:.4g}], outside [0, 1]: "
                        "sigma and the radii are in pixel units of [0,1] images (divide 0..255 "
                        f"images by 255){allow}")


def sample_counts(base: Base, x: torch.Tensor, n: int | Sequence[int], sigma: float,
                  batch_size: int, num_classes: int | None = None,
                  generator: torch.Generator | None = None, noise: ImageNoise | None = None,
                  allow_out_of_range: bool = False) -> torch.Tensor:
    """Counts of base(x_i + σε) over n independent draws ε ~ N(0, I) per image.

    x: (B, *shape) clean images on any device, finite and in [0, 1] (unless
    `allow_out_of_range`). The noise is drawn there: from `noise` (one counter-based stream per
    image, see ImageNoise: the same draws for an image however it is batched), else from
    `generator` (one stream over the whole call; it must live on x's device). The B·n samples form
    one stream cut into chunks of <= batch_size that mix images; no chunk of noise larger than
    batch_size is ever held. n may be a sequence of stage sizes (n0, n1, ...): each image then gets
    sum(n) fresh draws, the first n0 counted in stage 0, the next n1 in stage 1, ... Returns int64
    counts on the CPU, (B, K+1) for an int n, (B, S, K+1) for S stages; the last column counts the
    reject label K. The same generator state (or noise seed and positions) gives identical counts.
    """
    single = not isinstance(n, Sequence)
    stages = (n,) if single else tuple(n)
    if not stages:
        raise ValueError("n: need at least one stage")
    stages = tuple(check_positive_int("n", s) for s in stages)
    sigma = check_positive("sigma", sigma)
    batch_size = check_positive_int("batch_size", batch_size)
    L = _num_classes(base, num_classes) + 1
    check_images(x, allow_out_of_range)
    B, S, per, dev = x.shape[0], len(stages), sum(stages), x.device
    if noise is not None and len(noise) != B:
        raise ValueError(f"noise has {len(noise)} streams for {B} images")
    ends = torch.tensor(np.cumsum(stages)[:-1], device=dev)  # stage boundaries in an image's draws
    # one cell per (image, stage, label), and a last one counting outputs that are no label
    # (SmoothingSystem gives INVALID for non-finite logits): checked at the one sync below
    counts = torch.zeros(B * S * L + 1, dtype=torch.long, device=dev)
    shape = tuple(x.shape[1:])
    with torch.inference_mode():
        for start in range(0, B * per, batch_size):
            stop = min(start + batch_size, B * per)
            j = torch.arange(start, stop, device=dev)  # (b,) position in the stream
            img = j // per  # (b,) which image
            stage = torch.bucketize(j % per, ends, right=True)  # (b,) which stage
            if noise is None:
                eps = torch.randn((stop - start, *shape), generator=generator, device=dev,
                                  dtype=x.dtype)
            else:  # each image's piece of the chunk from its own stream
                pieces = []
                for b in range(start // per, (stop - 1) // per + 1):
                    lo, hi = max(start, b * per) - b * per, min(stop, (b + 1) * per) - b * per
                    p0 = int(noise.pos[b])
                    pieces.append(noise.draw(b, p0 + lo, p0 + hi, shape, dev, x.dtype))
                eps = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            noisy = eps.mul(sigma).add_(x[img])  # (b, *shape)
            labels = base(noisy).long()  # (b,) in {0..K}
            cell = torch.where((labels >= 0) & (labels < L), (img * S + stage) * L + labels,
                               B * S * L)  # (b,)
            # scatter_add_ (not bincount, which syncs on CUDA to size its output)
            counts.scatter_add_(0, cell, torch.ones_like(labels))
    if noise is not None:
        noise.pos += per
    counts = counts.cpu()  # the one host sync
    if invalid := int(counts[-1]):
        raise NetworkError(
            f"the base classifier gave {invalid} of {B * per} noisy samples no label in 0..{L - 1}"
            f" (reject = {L - 1}): non-finite logits (NaN or Inf) of the classifier or the "
            "rejector on noisy inputs, or a base returning other values. Certificates would count "
            "them as some class: check the networks on noisy inputs (and bf16=false if it "
            "overflows there)")
    counts = counts[:-1].view(B, S, L)
    return counts[:, 0] if single else counts


def certify_selected(counts: np.ndarray, sigma: float, alpha: float, bound: str) -> CertifyDetails:
    """Certificates from the two stages of draws of each image, counts (B, 2, K+1): ĉ_A is the
    first maximum over the real classes of the N0 selection counts, bounded with the fresh N
    estimation counts (certify_details). SmoothedClassifier.certify and the one pass for several
    systems (tasks.prediction) both certify through it."""
    c_hat = counts[:, 0, :-1].argmax(-1)  # (B,) first maximum = lowest index
    return certify_details(counts[:, 1], c_hat, sigma, alpha, bound)


@dataclass
class Certificate(CertifyDetails):
    """certify_details for each image (prediction, radius, n_A, ...), plus the raw counts."""
    counts0: np.ndarray  # (B, K+1) the N0 selection draws
    counts: np.ndarray  # (B, K+1) the N estimation draws


class SmoothedClassifier:
    """g_R(x) = argmax over the K real classes c of P(base(x + σε) = c), ε ~ N(0, I).

    base returns labels in {0..K}, K = reject; R is never an answer of g_R. σ in pixel units of
    [0,1] images: inputs outside [0, 1] (or non-finite) are refused unless `allow_out_of_range`.
    Noise: a `generator` (one stream per call) or an ImageNoise (one stream per image).
    """

    def __init__(self, base: Base, num_classes: int | None = None, sigma: float = 0.25,
                 allow_out_of_range: bool = False):
        self.base = base
        self.num_classes = _num_classes(base, num_classes)
        self.sigma = check_positive("sigma", sigma)
        self.allow_out_of_range = bool(allow_out_of_range)

    def counts(self, x: torch.Tensor, n: int | Sequence[int], batch_size: int,
               generator: torch.Generator | None = None,
               noise: ImageNoise | None = None) -> np.ndarray:
        """sample_counts with this classifier's base, σ and input rule, as numpy."""
        return sample_counts(self.base, x, n, self.sigma, batch_size, self.num_classes, generator,
                             noise, self.allow_out_of_range).numpy()

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                bound: str = "paper", generator: torch.Generator | None = None,
                noise: ImageNoise | None = None) -> Certificate:
        """Certify each image of x (B, *shape): c_hat = argmax over real classes of n0 draws
        (ties to the lowest index), then bound its probability with n fresh draws.

        With probability >= 1 - alpha over the noise, separately for each image, if
        prediction != ABSTAIN then g_R(x + δ) = prediction for all ||δ||_2 <= radius
        (see certify_details for the bounds). One pass over the device, one host sync.
        """
        n0, n = check_positive_int("n0", n0), check_positive_int("n", n)
        alpha, bound = check_alpha(alpha), check_bound(bound)
        counts = self.counts(x, (n0, n), batch_size, generator, noise)  # (B, 2, K+1)
        d = certify_selected(counts, self.sigma, alpha, bound)
        return Certificate(**vars(d), counts0=counts[:, 0], counts=counts[:, 1])

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None,
                noise: ImageNoise | None = None) -> np.ndarray:
        """Predictions (B,) int64, ABSTAIN where unsure. With probability >= 1 - alpha over the
        noise, separately for each image, a returned class equals g_R(x)."""
        alpha = check_alpha(alpha)
        return predict_counts(self.counts(x, n, batch_size, generator, noise), alpha)
