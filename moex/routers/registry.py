"""Name -> router class."""

from __future__ import annotations

from typing import Callable

REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"router {name!r} registered twice")
        REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def build_router(name: str, *, d_model: int, cfg):
    """Instantiate router `name` for a layer described by MoEConfig `cfg`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown router {name!r}; valid routers: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](d_model=d_model, cfg=cfg)


def known_routers() -> list[str]:
    """Names of every registered router (importing moex.routers registers them)."""
    import moex.routers  # noqa: F401

    return sorted(REGISTRY)
