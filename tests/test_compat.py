"""What acc_bluesky relies on in its upstream libraries, checked against the installed versions: a test here fails
loudly when an upstream release changes it. Private APIs live only in ``acc_bluesky._compat.<upstream>`` and each
has a test here; the data layer uses none (only the public behaviours below).
"""

from __future__ import annotations

import inspect

import pytest


# ------------------------------------------------------------------------------------------------- bluesky
def test_bluesky_validator_then_normalizer_fill_the_start_document():
    """make_run_engine's FAIR filling: ``md_validator`` sees the merged metadata (with ``plan_name``), then the
    ``md_normalizer``'s return value *is* the start document."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd.sim import det

    seen = {}
    RE = RunEngine(context_managers=[], call_returns_result=True)  # noqa: N806

    def validator(md):
        seen["validator"] = dict(md)

    def normalizer(md):
        assert "validator" in seen  # called after the validator
        return {**md, "filled": True}

    RE.md_validator, RE.md_normalizer = validator, normalizer
    docs = []
    result = RE(bp.count([det]), lambda name, doc: docs.append((name, doc)))
    assert seen["validator"]["plan_name"] == "count"
    start = next(d for n, d in docs if n == "start")
    assert start["filled"] is True
    # RE(plan) with call_returns_result: the public RunEngineResult that RunResult wraps
    from bluesky.run_engine import RunEngineResult

    assert isinstance(result, RunEngineResult)
    assert result.run_start_uids == (start["uid"],) and result.exit_status == "success"
    for field in ("plan_result", "interrupted", "reason", "exception"):
        assert hasattr(result, field)


def test_bluesky_registered_command_returns_its_value_to_the_plan():
    """``yield Msg("acc_catalog")``: RunEngine.register_command with an async function, its result sent back."""
    from bluesky import RunEngine
    from bluesky.utils import Msg

    RE = RunEngine(context_managers=[], call_returns_result=True)  # noqa: N806

    async def answer(msg):
        return 42

    RE.register_command("acc_test_answer", answer)

    def plan():
        return (yield Msg("acc_test_answer"))

    assert RE(plan()).plan_result == 42


def test_bluesky_preprocessors_and_msg_mutator_are_public():
    from bluesky import RunEngine
    from bluesky.preprocessors import msg_mutator

    assert isinstance(RunEngine(context_managers=[]).preprocessors, list)
    assert list(msg_mutator((m for m in ()), lambda m: m)) == []


# --------------------------------------------------------------------------------------- tiled, plugins
def test_fastapi_dependant_memo_of_the_server_process():
    """``acc_bluesky._compat.tiled.memoize_fastapi_dependants`` (applied in server processes only): FastAPI's
    ``get_dependant(*, path, call, ...)`` still exists, and the memo returns the very tree FastAPI builds."""
    import subprocess
    import sys

    code = (
        "import inspect, fastapi.dependencies.utils as fdu\n"
        "from acc_bluesky._compat.tiled import memoize_fastapi_dependants\n"
        "def dep(q: int = 0): return q\n"
        "from fastapi import Depends\n"
        "def route2(x: int, d: int = Depends(dep)): return x\n"
        "plain = fdu.get_dependant(path='/a', call=route2)\n"
        "assert memoize_fastapi_dependants(), 'FastAPI get_dependant moved'\n"
        "a = fdu.get_dependant(path='/a', call=route2); b = fdu.get_dependant(path='/a', call=route2)\n"
        "assert a is b and [p.name for p in a.query_params] == [p.name for p in plain.query_params]\n"
        "assert [d.call for d in a.dependencies] == [dep]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # (a patch: not here)
    assert proc.returncode == 0, proc.stderr[-2000:]



def test_tiled_writer_public_signature():
    from bluesky_tiled_plugins import TiledWriter

    params = inspect.signature(TiledWriter).parameters
    for name in ("client", "batch_size", "max_array_size", "backup_dictionary"):
        assert name in params, name


def test_tiled_writer_normalizer_emits_through_its_dispatcher():
    """The recorder's normalizer overrides ``RunNormalizer.emit`` (validate, then ``self.dispatcher.process``) to
    skip the event re-validation: both must still exist and events must still go through ``emit``."""
    from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer

    from acc_bluesky.data.recorder import _normalizer_class

    norm = _normalizer_class()()
    assert isinstance(norm, RunNormalizer) and hasattr(norm.dispatcher, "process")
    got = []
    norm.subscribe(lambda name, doc: got.append(name))
    import bluesky.plans as bp
    from bluesky import RunEngine
    from ophyd.sim import det

    RunEngine(context_managers=[])(bp.count([det], 2), norm)
    assert got.count("event") == 2 and got[0] == "start" and got[-1] == "stop"


def test_tiled_client_api_key_introspection_and_catalog_factory():
    from tiled.catalog import from_uri
    from tiled.client.context import Context

    assert callable(Context.which_api_key)  # the up-front scope check of a recording key
    params = inspect.signature(from_uri).parameters
    assert "writable_storage" in params and "specs" in params


def test_uvicorn_serves_pre_bound_sockets():
    """The server binds its socket itself (port 0, address published before uvicorn runs) and stops when idle."""
    import uvicorn

    assert "sockets" in inspect.signature(uvicorn.Server.run).parameters
    server = uvicorn.Server(uvicorn.Config(lambda scope, receive, send: None))
    assert server.should_exit is False


def test_databroker_v1_and_v2_entry_points():
    pytest.importorskip("databroker")
    from databroker.v1 import Broker
    from databroker.v2 import CatalogOfBlueskyRuns

    assert hasattr(Broker, "__call__") and hasattr(CatalogOfBlueskyRuns, "v1")
