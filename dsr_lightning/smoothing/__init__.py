"""Statistics and Monte Carlo engine of the smoothed classifier with rejection (no Lightning)."""
from .attack import (
    ATTACK_KEY_OFFSET,
    attack_noise,
    default_step_size,
    pgd_attack,
    smoothed_loss,
    smoothed_true_prob,
)
from .bounds import cp_lower, cp_upper
from .certificates import ABSTAIN, CertifyDetails, certify_counts, certify_details, predict_counts
from .checks import (
    BOUNDS,
    check_alpha,
    check_bound,
    check_counts,
    check_positive,
    check_positive_int,
)
from .engine import (
    NOISE_BLOCK,
    Certificate,
    ImageNoise,
    SmoothedClassifier,
    certify_selected,
    check_images,
    noise_scheme,
    sample_counts,
)
from .staged import (
    StagedCertificate,
    certify_staged,
    check_stages,
    default_weights,
    staged_look,
)
from .threshold import choose_threshold, collect_draws

__all__ = [
    "ATTACK_KEY_OFFSET", "attack_noise", "default_step_size", "pgd_attack", "smoothed_loss",
    "smoothed_true_prob",
    "ABSTAIN", "BOUNDS", "Certificate", "CertifyDetails", "SmoothedClassifier", "certify_counts",
    "certify_selected",
    "certify_details", "check_alpha", "check_bound", "check_counts", "check_positive",
    "check_positive_int", "cp_lower", "cp_upper", "predict_counts", "sample_counts",
    "ImageNoise", "NOISE_BLOCK", "noise_scheme", "StagedCertificate", "certify_staged",
    "check_images", "check_stages",
    "choose_threshold", "collect_draws", "default_weights", "staged_look",
]
