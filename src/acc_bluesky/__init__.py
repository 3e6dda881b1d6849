"""acc_bluesky: an accelerator middle layer and pyAT digital twin on the Bluesky ecosystem.

Public API (names users' scripts rely on)::

    import acc_bluesky as ab
    profile = ab.load_profile("ebs")
    m = ab.connect(profile, mode="sim", seed=1)
    RE = ab.make_run_engine()
    cat = ab.open_catalog()

The attributes are imported lazily so that ``acc_bluesky.twin`` / ``profile`` / ``analysis`` load without
bluesky or ophyd-async (they run on Dask workers and in notebooks).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_profile": ("acc_bluesky.profile", "load_profile"),
    "Profile": ("acc_bluesky.profile", "Profile"),
    "Twin": ("acc_bluesky.twin", "Twin"),
    "connect": ("acc_bluesky.machine", "connect"),
    "Machine": ("acc_bluesky.machine", "Machine"),
    "make_run_engine": ("acc_bluesky.data", "make_run_engine"),
    "open_catalog": ("acc_bluesky.data", "open_catalog"),
    "analysis": ("acc_bluesky.analysis", None),
    "plans": ("acc_bluesky.plans", None),
    "plan_stubs": ("acc_bluesky.plan_stubs", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'acc_bluesky' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
