"""hydra/launcher=slurm: Hydra's submitit SLURM launcher, waiting for every job before it reads any result;
hydra/launcher=batched_slurm: the batched launcher's populations through it, one SLURM job each."""
