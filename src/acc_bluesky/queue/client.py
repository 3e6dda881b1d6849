"""Thin helpers over ``bluesky_queueserver_api.zmq.REManagerAPI``: submit, status, run and wait, history.

The RE Manager validates every submitted plan against the plan's signature and annotations (types, enums of
family and corrector names, ranges) before it enters the queue; :func:`submit` turns a refusal into
:class:`SubmissionRefused` with the server's reason. A plan that fails while running is recorded in the history
(``exit_status="failed"``), stops the queue and is put back at the front of the queue with a new item uid:
remove it (``api.item_remove(pos="front")``) or fix it before starting the queue again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

__all__ = [
    "QueueError",
    "SubmissionRefused",
    "call_function",
    "connect_api",
    "format_item",
    "history",
    "parse_params",
    "run_queue",
    "start_queue",
    "status",
    "submit",
    "wait_for_items",
]


class QueueError(RuntimeError):
    """A queue request failed (manager unreachable, queue cannot start, wait timed out)."""


class SubmissionRefused(QueueError):
    """The RE Manager refused a plan at submission: unknown plan, unknown keyword, wrong type, not permitted."""

    def __init__(self, plan: str, kwargs: Mapping[str, Any], reason: str):
        self.plan = plan
        self.kwargs = dict(kwargs)
        self.reason = reason
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        super().__init__(f"the queue refused {plan}({args}): {reason}. Nothing was queued; see the plan's "
                         f"parameters with `acc-bluesky queue plans` or api.plans_allowed()")


def connect_api(zmq_control_addr: str, zmq_info_addr: str | None = None, *, timeout: float = 5.0):
    """A ZMQ ``REManagerAPI`` on ``zmq_control_addr`` (e.g. ``"tcp://127.0.0.1:60615"``).

    Args:
        zmq_control_addr: the manager's control socket.
        zmq_info_addr: its info socket (console output), optional.
        timeout: seconds to wait for each reply.
    """
    from bluesky_queueserver_api.zmq import REManagerAPI

    return REManagerAPI(zmq_control_addr=zmq_control_addr, zmq_info_addr=zmq_info_addr, timeout_recv=timeout)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_params(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``["delta=0.2", "correctors=[HST_001, VST_002]", "bipolar=false"]`` -> plan keyword arguments.

    Values are read as YAML scalars/lists/maps (numbers, ``true``/``false``, ``null``, ``[a, b]``,
    ``{k: v}``); anything else stays a string. A repeated key is an error.
    """
    out: dict[str, Any] = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"parameter {p!r}: expected KEY=VALUE with KEY a Python identifier "
                             f"(e.g. delta=0.2 or correctors='[HST_001, HST_002]')")
        if key in out:
            raise ValueError(f"parameter {key!r} given twice")
        out[key] = _parse_value(value)
    return out


def _request(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - RequestFailedError, RequestTimeoutError, ...
        raise QueueError(f"{what}: {err}") from err


def _clean_reason(msg: str) -> str:
    """The manager's refusal without the echoed item and pydantic's documentation links."""
    keep = [ln.rstrip() for ln in msg.strip().splitlines()
            if ln.strip() and not ln.strip().startswith(("For further information", "Plan: {"))]
    # an enum of 450 corrector names: keep the start of the list and the rejected input at the end
    keep = [ln if len(ln) <= 400 else f"{ln[:200]} ... {ln[-150:]}" for ln in keep]
    text = "\n".join(keep)
    for prefix in ("Failed to add an item: ", "Plan validation failed: "):
        text = text.removeprefix(prefix)
    return text


def submit(api, plan: str, kwargs: Mapping[str, Any] | None = None, *, args: Sequence[Any] = (),
           user: str | None = None, group: str | None = None, pos: str | int | None = None) -> str:
    """Add a plan to the queue; the manager validates it first.

    Args:
        api: a connected ``REManagerAPI``.
        plan: plan name as listed by the manager.
        kwargs: plan keyword arguments (JSON-serialisable: numbers, strings, lists, dicts).
        args: positional arguments (rarely needed).
        user: user name recorded with the item (default: the API's).
        group: user group whose permissions apply (default ``"primary"``).
        pos: ``"back"`` (default), ``"front"`` or an index.

    The user and group go into the run's start document (``operator``, ``user_group``), so the catalogue says who
    queued each measurement.

    Returns:
        The queue item uid.

    Raises:
        SubmissionRefused: the plan is unknown or not permitted for ``group``, or a parameter is unknown, missing
            or of the wrong type, or out of its declared range. Nothing is queued.
    """
    kw = dict(kwargs or {})
    meta = {}
    if user:
        meta["operator"] = user
    if group:
        meta["user_group"] = group
    item = {"item_type": "plan", "name": plan, "args": list(args), "kwargs": kw, "meta": meta}
    try:
        resp = api.item_add(item, pos=pos, user=user, user_group=group)
    except api.RequestFailedError as err:
        reason = err.response.get("msg", str(err)) if isinstance(err.response, Mapping) else str(err)
        raise SubmissionRefused(plan, kw, _clean_reason(reason)) from None
    except Exception as err:  # noqa: BLE001
        raise QueueError(f"could not submit {plan}: {err}") from err
    return resp["item"]["item_uid"]


def status(api) -> dict[str, Any]:
    """The manager status (``manager_state``, ``worker_environment_exists``, ``items_in_queue``, ...)."""
    return _request("status", api.status, reload=True)


def history(api) -> list[dict[str, Any]]:
    """Completed, failed and aborted items, oldest first; each has ``result`` with ``exit_status``, ``run_uids``,
    ``msg`` and ``traceback``."""
    return _request("history", api.history_get, reload=True)["items"]


def start_queue(api) -> str:
    """Start processing the queue; returns the history uid before starting (for :func:`wait_for_items`)."""
    st = status(api)
    if not st["worker_environment_exists"]:
        raise QueueError("the worker environment is closed: open it with api.environment_open() (or restart "
                         "`acc-bluesky queue start`)")
    if st["manager_state"] == "executing_queue":
        return st["plan_history_uid"]
    _request("start the queue", api.queue_start)
    return st["plan_history_uid"]


def wait_for_items(api, item_uids: Sequence[str], *, timeout: float = 600.0, since: str | None = None,
                   poll: float = 0.2) -> list[dict[str, Any] | None]:
    """Wait until every item in ``item_uids`` is in the history, or the queue stops (failure, pause, end).

    Args:
        api: a connected ``REManagerAPI``.
        item_uids: queue item uids returned by :func:`submit`.
        timeout: seconds.
        since: ``plan_history_uid`` before the queue was started (from :func:`start_queue`): the queue counts as
            stopped only once the history changed, so a wait started just after ``queue_start`` is safe.
        poll: seconds between status polls.

    Returns:
        The history item of each uid, in order; ``None`` for an item that did not run because the queue stopped
        (after a failure the failed item is back at the front of the queue under a new uid).

    Raises:
        QueueError: timeout.
    """
    uids = list(item_uids)
    t_end = time.monotonic() + timeout
    while True:
        st = status(api)
        found: dict[str, dict[str, Any]] = {}
        if st["items_in_history"]:
            for h in history(api):
                if h.get("item_uid") in uids:
                    found[h["item_uid"]] = h
        if len(found) == len(uids):
            return [found[u] for u in uids]
        stopped = st["manager_state"] in ("idle", "paused") and (since is None or st["plan_history_uid"] != since)
        if stopped:
            return [found.get(u) for u in uids]
        if time.monotonic() > t_end:
            raise QueueError(f"{len(uids) - len(found)} of {len(uids)} queue item(s) not finished after "
                             f"{timeout} s (manager {st['manager_state']!r}, running "
                             f"{st.get('running_item_uid')!r})")
        time.sleep(poll)


def run_queue(api, item_uids: Sequence[str], *, timeout: float = 600.0) -> list[dict[str, Any] | None]:
    """Start the queue and wait for ``item_uids`` (see :func:`wait_for_items`)."""
    since = start_queue(api)
    return wait_for_items(api, item_uids, timeout=timeout, since=since)


def call_function(api, name: str, *args: Any, user: str | None = None, group: str | None = None,
                  background: bool = False, timeout: float = 60.0, **kwargs: Any) -> Any:
    """Execute a function of the worker namespace (e.g. ``sim_fault``) and return its return value.

    ``background=False`` runs it when the worker is idle (between plans); ``True`` runs it in a thread while a
    plan runs. Functions a group may call are listed in its ``allowed_functions`` permissions.

    Raises:
        QueueError: refused (unknown or not permitted), failed (with the worker's traceback) or timed out.
    """
    from bluesky_queueserver_api import BFunc

    item = BFunc(name, *args, **kwargs)
    resp = _request(f"execute {name}", api.function_execute, item, run_in_background=background, user=user,
                    user_group=group)
    uid = resp["task_uid"]
    try:
        api.wait_for_completed_task(uid, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - WaitTimeoutError
        raise QueueError(f"{name} did not complete within {timeout} s: {err}") from err
    res = _request(f"result of {name}", api.task_result, uid)["result"]
    if not res.get("success"):
        raise QueueError(f"{name} failed in the worker: {res.get('msg')}\n{res.get('return_value') or ''}")
    return res.get("return_value")


def format_item(item: Mapping[str, Any]) -> str:
    """One line: ``measure_orm(delta=0.2) [completed] runs: 1a2b...`` (queue or history item)."""
    kw = ", ".join(f"{k}={v!r}" for k, v in (item.get("kwargs") or {}).items())
    line = f"{item.get('name')}({kw})"
    user = item.get("user")
    if user:
        line += f" by {user} ({item.get('user_group')})"
    res = item.get("result")
    if res:
        line += f" [{res.get('exit_status')}]"
        if res.get("run_uids"):
            line += " runs: " + ", ".join(res["run_uids"])
        if res.get("msg"):
            line += f"\n    {res['msg'].strip().splitlines()[-1]}"
    return line
