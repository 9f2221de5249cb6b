"""Parallelism: launch detection (torchrun, deepspeed, Slurm), expert-parallel process
groups and all-to-all dispatch, and resharding of expert checkpoints. Submodules are
imported explicitly (``from moex.parallel.launch import detect_launch``) to keep this
import light."""
