"""Shared test helpers: exact machine-state comparison, interrupting a plan at its k-th step, run documents."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from bluesky.utils import Msg, RunEngineInterrupted


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class Interrupt:
    """Preprocessor: forwards a plan's messages and, at its k-th step (a ``set`` message or an event ``save``),
    does ``action`` before the message runs: throw an exception into the plan, yield a ``pause``, or call a
    function (e.g. lose the beam). Records whether the machine had been changed before that moment."""

    def __init__(self, machine, k: int, action):
        self.machine, self.k, self.action = machine, k, action
        self.count = 0
        self.fired = False
        self.before = machine.twin.snapshot()
        self.changed = False

    def __call__(self, plan):
        gen = iter(plan)
        reply, exc = None, None
        while True:
            try:
                msg = gen.throw(exc) if exc is not None else gen.send(reply)
            except StopIteration as stop:
                return stop.value
            exc = None
            if msg.command in ("set", "save"):
                self.count += 1
                if self.count == self.k:
                    self.fired = True
                    if isinstance(self.action, BaseException):
                        exc, reply = self.action, None
                        continue
                    if self.action == "pause":
                        try:
                            yield Msg("pause", None, defer=False)
                        except BaseException as err:  # noqa: BLE001 - abort/stop while paused: to the plan
                            exc, reply = err, None
                            continue
                    else:
                        self.action()
            try:
                reply = yield msg
            except BaseException as err:  # noqa: BLE001 - forward RunEngine exceptions (abort, stop) to the plan
                exc = err
            if not self.fired and not self.changed:  # (a set completes at its wait: check after every message)
                self.changed = not same(self.machine.twin.snapshot(), self.before)


def draw_step(name: str, mode: str, lo: int, hi: int) -> int:
    """The step at which to interrupt plan ``name`` in ``mode``: drawn in [lo, hi], seeded by both (reproducible)."""
    return int(np.random.default_rng(zlib.crc32(f"{name}/{mode}".encode())).integers(lo, hi + 1))


def events(docs, stream: str = "primary") -> list[dict]:
    """The event documents of ``stream`` among collected ``(name, doc)`` pairs."""
    names = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    return [d for n, d in docs if n == "event" and names[d["descriptor"]] == stream]


# ---------------------------------------------------------------------------------------------------------------
# module-scoped RunEngine fixtures (import them into a test module: ``from helpers import module_run_engine, ...``)
@pytest.fixture(scope="module", name="RE")
def module_run_engine(tmp_path_factory):
    """One RunEngine for the module, on the session's catalogue folder (one server for every test)."""
    from conftest import _session_catalog

    from acc_bluesky.data import make_run_engine

    re = make_run_engine(catalog_dir=_session_catalog(tmp_path_factory), progress=False)
    yield re
    if re.state != "idle":
        re.halt()


@pytest.fixture(scope="module", name="catalog")
def module_catalog(RE):  # noqa: N803 - the bluesky name
    return RE.catalog


@pytest.fixture(name="docs")
def run_documents(RE):  # noqa: N803 - the bluesky name
    """The ``(name, document)`` pairs of the runs of one test."""
    out = []
    token = RE.subscribe(lambda name, doc: out.append((name, doc)))
    yield out
    RE.unsubscribe(token)


def run_interrupted(RE, hook, plan, mode: str, stops) -> None:  # noqa: N803 - the bluesky name
    """Run ``hook(plan)`` whose interruption is ``mode`` ("exception": the injected fault; "abort"/"stop": a pause,
    then ``RE.abort()``/``RE.stop()``) and check how the run ended (``stops()``: the stop documents seen)."""
    if mode == "exception":
        with pytest.raises(RuntimeError, match="injected fault"):
            RE(hook(plan))
        assert stops()[-1]["exit_status"] == "fail"
        return
    with pytest.raises(RunEngineInterrupted):
        RE(hook(plan))
    assert RE.state == "paused"
    RE.abort("test abort") if mode == "abort" else RE.stop()
    assert RE.state == "idle"
    assert stops()[-1]["exit_status"] == ("abort" if mode == "abort" else "success")
