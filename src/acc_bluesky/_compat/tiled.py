"""Private APIs of Tiled's server stack (FastAPI), in one place; each has a test in ``tests/test_compat.py``.

Used only inside a catalogue server process (``acc-bluesky catalog serve``), never in a session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["memoize_fastapi_dependants"]


def memoize_fastapi_dependants() -> bool:
    """Memoise ``fastapi.dependencies.utils.get_dependant`` in this process (a server process only).

    FastAPI rebuilds the dependency tree of a route's dependencies at every request when the app has
    ``dependency_overrides`` (Tiled overrides ``get_settings``): ~160 ``get_dependant`` calls, about 40 % of a
    request's CPU. The tree depends only on the arguments, so it is memoised. Returns False (and changes nothing)
    if FastAPI no longer has that function with keyword-only ``path`` and ``call``.
    """
    import inspect

    import fastapi.dependencies.utils as fdu

    original = getattr(fdu, "get_dependant", None)
    if original is None:
        return False
    if getattr(original, "_acc_bluesky_memo", False):
        return True
    params = inspect.signature(original).parameters
    if not all(name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("path", "call")):
        return False
    memo: dict[Any, Any] = {}

    def get_dependant(*, path: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            key = (path, call, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
            found = memo.get(key)
        except TypeError:  # an unhashable argument: no memo
            return original(path=path, call=call, **kwargs)
        if found is None:
            found = memo[key] = original(path=path, call=call, **kwargs)
        return found

    get_dependant._acc_bluesky_memo = True  # type: ignore[attr-defined]
    fdu.get_dependant = get_dependant
    return True
