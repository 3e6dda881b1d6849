"""One way to name a run everywhere: every plan parameter that takes "a run of that tool" (``orm=``,
``response=``, ``config=``, ``target=``, ``bba=``, ``loco=``) is resolved here.

A run reference is a result object (``OrbitResponse`` ...), a uid, a partial uid, what ``RE(plan)`` returned, or a
Tiled run. A uid is looked up in this session's results first (what the tools of this process recorded), then
in the catalogue of the RunEngine running the plan (``Msg("acc_catalog")``), then in the default catalogue.
A run of the wrong tool is refused, naming the tool it is and the one expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bluesky.utils import InvalidCommand, Msg, MsgGenerator

from ..analysis._common import run_start
from .tool import remembered

__all__ = ["RunNotFound", "WrongRun", "resolve", "find_run", "run_uid"]


class RunNotFound(KeyError):
    """No run with that uid in this session or the catalogues looked in."""

    def __str__(self) -> str:
        return str(self.args[0])


class WrongRun(ValueError):
    """A run recorded by another tool than the parameter asks for."""


def run_uid(ref: Any) -> str | None:
    """The uid a reference names (a uid string, ``RE(...)``'s result, a Tiled run, a result object), or None."""
    if isinstance(ref, str):
        return str.__str__(ref)
    uid = getattr(ref, "uid", None)
    if isinstance(uid, str) and uid:
        return uid
    start = run_start(ref)
    return start.get("uid")


def _catalogs() -> MsgGenerator[list[tuple[str, Any]]]:
    out: list[tuple[str, Any]] = []
    try:
        cat = yield Msg("acc_catalog")
    except InvalidCommand:
        cat = None
    if cat is not None:
        out.append(("the RunEngine's catalogue", cat))
    from .. import data

    try:
        default = data.open_catalog()
    except Exception as err:  # noqa: BLE001 - the default catalogue is a fallback only
        out.append((f"the default catalogue (unavailable: {err})", None))
    else:
        out.append(("the default catalogue", default))
    return out


def _lookup(cat: Any, uid: str) -> Any:
    try:
        return cat[uid]
    except (KeyError, ValueError):
        pass
    if len(uid) >= 36:
        raise KeyError(uid)
    try:
        from tiled.queries import Regex

        hits = cat.search(Regex("start.uid", f"^{uid}"))
        keys = list(hits.keys())[:3]  # (the search is lazy: a server without regex support refuses it here)
    except Exception:  # noqa: BLE001 - not a Tiled catalogue or no regex support: no partial match
        raise KeyError(uid) from None
    if len(keys) == 1:
        return hits[keys[0]]
    if len(keys) > 1:
        raise KeyError(f"partial uid {uid!r} matches several runs ({keys}); give more characters")
    raise KeyError(uid)


def find_run(ref: Any, tools: Sequence[str] = (), what: str = "run") -> MsgGenerator[Any]:
    """The Tiled run (or remembered result) a reference names, checked to be of one of ``tools``."""
    if ref is None:
        raise RunNotFound(f"no {what} given")
    if hasattr(ref, "metadata") and not isinstance(ref, str):
        run = ref
    else:
        uid = run_uid(ref)
        if uid is None:
            raise TypeError(f"{what} must be a run uid, what RE(...) returned, a Tiled run or a result object; "
                            f"got {type(ref).__name__}")
        hit = remembered(uid)
        if hit is not None:
            tool_name, value = hit
            if tools and tool_name not in tools:
                raise WrongRun(f"run {uid[:8]} is a {tool_name!r} run; {what} must be a run of "
                               f"{' or '.join(map(repr, tools))}")
            return value
        tried = []
        run = None
        for label, cat in (yield from _catalogs()):
            if cat is None:
                tried.append(label)
                continue
            try:
                run = _lookup(cat, uid)
                break
            except KeyError as err:
                msg = err.args[0] if err.args and isinstance(err.args[0], str) and " " in err.args[0] else ""
                tried.append(f"{label}{': ' + msg if msg else ''}")
        if run is None:
            raise RunNotFound(f"no {what} with uid {uid!r} in this session or {'; '.join(tried)}. Pass the run "
                              "itself (catalog[uid]) or open the RunEngine on the catalogue that holds it "
                              "(make_run_engine(catalog_dir=...))")
    start = run_start(run)
    if tools and start.get("tool") not in tools:
        raise WrongRun(f"run {start.get('uid', '?')[:8]} is a {start.get('tool')!r} run "
                       f"({start.get('plan_name', '?')}); {what} must be a run of {' or '.join(map(repr, tools))}")
    return run


def resolve(ref: Any, cls: type, tools: Sequence[str] = (), what: str = "run",
            convert: Callable[[Any], Any] | None = None) -> MsgGenerator[Any]:
    """``ref`` as an instance of ``cls``: itself if it is one, else read from its run with ``cls.from_run``
    (or ``convert(run)``)."""
    if isinstance(ref, cls):
        return ref
    run = yield from find_run(ref, tools, what)
    if isinstance(run, cls):
        return run
    value = (convert or cls.from_run)(run)
    if getattr(value, "uid", None) in (None, "") and hasattr(value, "uid"):
        try:
            value.uid = run_start(run).get("uid")
        except AttributeError:
            pass
    return value
