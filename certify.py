"""Certify a data split: `python certify.py system=rejection rejector_ckpt=... sigma=0.25`,
`system=denoised`, `system=plain`; `mode=predict` runs Algorithm 1. See conf/certify.yaml."""

import sys

import hydra
from omegaconf import DictConfig

import dsr_lightning.config  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="conf", config_name="certify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dsr_lightning.certification import certify
    from dsr_lightning.errors import USER_ERRORS

    try:
        result = certify(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"results: {result['outfile']}\nsettings: {result['settings']}")


if __name__ == "__main__":
    main()
