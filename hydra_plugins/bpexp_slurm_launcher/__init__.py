"""hydra/launcher=slurm: Hydra's submitit SLURM launcher, waiting for every job before it reads any result."""
