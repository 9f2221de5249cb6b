import os

# Triton decorates its helpers at import: the interpreter must be on before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# DeepSpeed picks its accelerator at import; there is no GPU in CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
