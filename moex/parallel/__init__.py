"""Parallelism helpers: launch detection (torchrun, deepspeed, Slurm) and,
later, expert-parallel process groups. Submodules are imported explicitly
(``from moex.parallel.launch import detect_launch``) to keep this import light."""
