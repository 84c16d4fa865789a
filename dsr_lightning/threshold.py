"""`python -m dsr_lightning.threshold CKPT` (= `dsr-threshold CKPT`): an entry
point only; the code is jobs.threshold."""

from dsr_lightning.cli import threshold_main

if __name__ == "__main__":
    raise SystemExit(threshold_main())
