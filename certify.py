"""Certify a data split: `python certify.py system=rejection rejector_ckpt=... sigma=0.25`,
`system=denoised`, `system=plain`; `mode=predict` runs Algorithm 1. The same as `dsr-certify`
(dsr_lightning.cli.certify_main); the configs are in dsr_lightning/conf."""

from dsr_lightning.cli import certify_main

if __name__ == "__main__":
    certify_main()
