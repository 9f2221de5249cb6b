import os


def _cuda_tier(config) -> bool:
    """`-m cuda` (and not `not cuda`): CUDA tests run for real, with compiled Triton and DeepSpeed on the GPU."""
    expr = config.option.markexpr or ""
    return "cuda" in expr and "not cuda" not in expr


def pytest_configure(config):
    # Runs before any test module is imported. The CPU suite (also on a GPU machine) forces
    # Triton's interpreter (triton decorates its helpers at import, so it must be on before
    # anything imports triton) and DeepSpeed's CPU accelerator (picked at its import).
    if _cuda_tier(config):
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# One session-wide local Slurm cluster for every test that asks for it (stopped at the end).
from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401
