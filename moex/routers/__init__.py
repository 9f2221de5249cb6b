"""Routers: one file each, looked up by name in one registry.

    router = build_router("moex", d_model=128, num_experts=8, top_k=2, cfg=moe_cfg)
    out = router(x_TD, experts)   # -> RouterOutput

An unknown name raises an error listing the valid ones.
"""

from moex.routers.base import RouterOutput, token_choice
from moex.routers.registry import REGISTRY, build_router, register

# Importing the modules registers them.
from moex.routers import topk as _topk  # noqa: F401,E402
from moex.routers import moex as _moex  # noqa: F401,E402
from moex.routers import expert_choice as _expert_choice  # noqa: F401,E402
from moex.routers import aux_free as _aux_free  # noqa: F401,E402
from moex.routers import hash as _hash  # noqa: F401,E402

__all__ = ["REGISTRY", "RouterOutput", "build_router", "register", "token_choice"]
