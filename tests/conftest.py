import os

# Triton decorates its helpers at import: the interpreter must be on before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed picks its accelerator at import; there is no GPU in CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# One session-wide local Slurm cluster for every test that asks for it (stopped at the end).
from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401
