"""Train one stage: `python train.py denoiser=dncnn sigma=0.5` (the rejector, the main job),
`python train.py stage=classifier ...`, `python train.py stage=denoiser ...`. See conf/train.yaml."""

import os
import sys

import hydra
from omegaconf import DictConfig

import dsr_lightning.config  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dsr_lightning.errors import USER_ERRORS
    from dsr_lightning.training import train

    try:
        result = train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one report, not one per DDP process
        print(f"outputs: {result['output_dir']}")
        if result.get("export"):
            print(f"exported: {result['export']}")
    return result["metrics"].get(cfg.stage.monitor)  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
