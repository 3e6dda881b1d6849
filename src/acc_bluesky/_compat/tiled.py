"""Private APIs of Tiled's server stack (FastAPI), in one place; each has a test in ``tests/test_compat.py``.

Used only inside a catalogue server process (``acc-bluesky catalog serve``), never in a session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["direct_path_lookup", "memoize_fastapi_dependants", "reuse_node_aliases"]


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


def reuse_node_aliases() -> bool:
    """Build Tiled's node lookups on reused SQLAlchemy aliases of its ``Node`` table (a server process only).

    ``tiled.catalog.adapter.node_from_segments`` makes a new ``aliased(orm.Node)`` per path segment at every
    lookup, and SQLAlchemy fills the column collection of every new alias (a proxy per column): about a quarter
    of a request's CPU in the server, as each request looks its path up one segment at a time. An alias is an
    immutable construct, so one per depth is made once and reused; the statements are the same (and their
    compiled forms now come from SQLAlchemy's cache). Returns False (and changes nothing) if Tiled no longer has
    that function with the ``(segments, root_id=0)`` signature.
    """
    import inspect

    try:
        import tiled.catalog.adapter as adapter
        from sqlalchemy import select
        from sqlalchemy.orm import aliased
        from tiled.catalog import orm
    except ImportError:
        return False
    original = getattr(adapter, "node_from_segments", None)
    if original is None:
        return False
    if getattr(original, "_acc_bluesky_aliases", False):
        return True
    params = list(inspect.signature(original).parameters)
    if params != ["segments", "root_id"]:
        return False
    aliases: list[Any] = []

    def node_from_segments(segments: Any, root_id: int = 0) -> Any:
        n = len(segments)
        while len(aliases) < n:
            aliases.append(aliased(orm.Node))
        nodes = [*aliases[:n], orm.Node]
        statement = select(nodes[-1]).select_from(nodes[0]).where(nodes[0].id == root_id)
        for i, segment in enumerate(segments):
            parent, child = nodes[i], nodes[i + 1]
            statement = statement.join(child, child.parent == parent.id).where(child.key == segment)
        return statement

    node_from_segments._acc_bluesky_aliases = True  # type: ignore[attr-defined]
    adapter.node_from_segments = node_from_segments
    return True


_GET_ENTRY_USERS = ("tiled.server.dependencies", "tiled.server.router", "tiled.server.zarr", "tiled.server.webhook_router")
_GET_ENTRY_PARAMS = ["path", "security_scopes", "principal", "authn_access_tags", "authn_scopes", "root_tree",
                     "session_state", "metrics", "structure_families", "access_policy"]


def direct_path_lookup() -> bool:
    """Look a request's path up in one query when the server has no access policy (a server process only).

    ``tiled.server.dependencies.get_entry`` walks the path one segment at a time, each step a lookup of its own
    (a join, then SQLAlchemy's eager loading of the node's data sources and their structures: three queries),
    so that an access policy can filter every level. With no access policy (``app.state.access_policy`` is None:
    the single-user key, and the key-database mode whose scopes are checked per route) the filtering at each
    level returns the node unchanged, and the catalogue adapter can go straight to the node of interest in one
    lookup: its own ``lookup_adapter(segments)``, which also handles a path that goes inside a file. A request on
    a run's array (3 segments) makes 3 queries instead of 9. Anything else (an access policy, a session state,
    a root that is not a catalogue) goes through Tiled's own walk. Returns False (and changes nothing) if Tiled
    no longer has ``get_entry`` with that signature in the modules that use it.
    """
    import importlib
    import inspect

    try:
        dependencies = importlib.import_module("tiled.server.dependencies")
        users = [importlib.import_module(name) for name in _GET_ENTRY_USERS]
        from fastapi import HTTPException
        from starlette.status import HTTP_404_NOT_FOUND, HTTP_410_GONE
    except ImportError:
        return False
    no_entry = getattr(dependencies, "NoEntry", None)
    broken_link = getattr(dependencies, "BrokenLink", None)
    if no_entry is None or broken_link is None:
        return False
    original = getattr(dependencies, "get_entry", None)
    if original is None:
        return False
    if getattr(original, "_acc_bluesky_direct", False):
        return True
    if list(inspect.signature(original).parameters) != _GET_ENTRY_PARAMS:
        return False
    if any(getattr(module, "get_entry", original) is not original for module in users):
        return False

    async def get_entry(path, security_scopes, principal, authn_access_tags, authn_scopes, root_tree,
                        session_state, metrics, structure_families=None, access_policy=None):
        if access_policy is not None or session_state or not hasattr(root_tree, "lookup_adapter"):
            return await original(path, security_scopes, principal, authn_access_tags, authn_scopes, root_tree,
                                  session_state, metrics, structure_families, access_policy)
        path_parts = [segment for segment in path.split("/") if segment]
        try:
            entry = await root_tree.lookup_adapter(path_parts)
        except broken_link as err:
            raise HTTPException(status_code=HTTP_410_GONE, detail=err.args[0])
        except no_entry:
            raise HTTPException(status_code=HTTP_404_NOT_FOUND, detail=f"No such entry: {path_parts}")
        if (structure_families is None) or (entry.structure_family in structure_families):
            return entry
        raise HTTPException(
            status_code=HTTP_404_NOT_FOUND,
            detail=(f"The node at {path} has structure family {entry.structure_family} "
                    f"and this endpoint is compatible with structure families {structure_families}"),
        )

    get_entry._acc_bluesky_direct = True  # type: ignore[attr-defined]
    for module in (dependencies, *users):
        if hasattr(module, "get_entry"):
            module.get_entry = get_entry
    return True
