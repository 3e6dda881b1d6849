"""The bluesky internals ``acc_bluesky._compat.bluesky`` relies on: fail loudly when they move."""

from __future__ import annotations

import inspect
import time

import pytest
from bluesky import RunEngine as BlueskyRunEngine
from bluesky.bundlers import RunBundler
from bluesky.utils import Msg
from event_model import DocumentNames, EventModelValidationError, schema_validators

from acc_bluesky._compat.bluesky import TrustingRunBundler
from acc_bluesky.data.run_engine import RunEngine


def test_the_run_engine_makes_its_bundlers_of_its_runbundler_class():
    assert BlueskyRunEngine.RunBundler is RunBundler
    assert "type(self).RunBundler(" in inspect.getsource(BlueskyRunEngine._open_run)
    src = inspect.getsource(RunBundler)
    assert "self._compose_descriptor = run.compose_descriptor" in inspect.getsource(RunBundler.open_run)
    assert "self._descriptors[desc_key] = self._compose_descriptor(" in src
    assert RunEngine.RunBundler is TrustingRunBundler


class _Readable:
    parent = None

    def __init__(self, name: str, keys: tuple[str, ...], read_keys: tuple[str, ...] | None = None):
        self.name, self._keys, self._read = name, keys, read_keys or keys

    def describe(self):
        return {k: {"source": "test", "dtype": "number", "shape": []} for k in self._keys}

    def read(self):
        return {k: {"value": 1.0, "timestamp": time.time()} for k in self._read}


def _one_event(obj):
    yield Msg("open_run")
    yield Msg("create", name="primary")
    yield Msg("read", obj)
    yield Msg("save")
    yield Msg("close_run")


def test_events_skip_the_schema_walk_but_stay_valid_and_keys_are_still_checked(monkeypatch):
    docs = []
    RE = RunEngine(call_returns_result=True)  # noqa: N806
    RE.subscribe(lambda n, d: docs.append((n, d)))
    calls = []
    original = schema_validators[DocumentNames.event].validate

    class Spy:
        @staticmethod
        def validate(doc):
            calls.append(doc)
            original(doc)

    monkeypatch.setitem(schema_validators, DocumentNames.event, Spy)
    RE(_one_event(_Readable("det", ("det-a", "det-b"))))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 1 and not calls  # no schema walk...
    original(events[0])  # ...and the event is valid
    bad = _Readable("bad", ("bad-a", "bad-b"), read_keys=("bad-a",))  # reads fewer keys than it describes
    with pytest.raises(EventModelValidationError, match="sets of keys must match"):
        RE(_one_event(bad))
