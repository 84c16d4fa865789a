"""The Hydra config tree, shipped inside the package (found through `pkg://dsr_lightning.conf`)."""
