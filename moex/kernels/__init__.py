"""Raw Triton kernels (installed as ``moex.kernels``); call them only through ``moex.ops``.

Importing a kernel module imports triton, which fixes interpreter mode at that moment:
set ``TRITON_INTERPRET=1`` before the first import to run the kernels on CPU tensors.
"""
