"""hydra/launcher=batched: a sweep's compatible jobs trained as one population (bpexp/population.py)."""
