"""Train one stage: `python train.py denoiser=dncnn sigma=0.5` (the rejector, the main job),
`python train.py stage=classifier ...`, `python train.py stage=denoiser ...`. The same as `dsr-train`
(dsr_lightning.cli.train_main); the configs are in dsr_lightning/conf."""

from dsr_lightning.cli import train_main

if __name__ == "__main__":
    train_main()
