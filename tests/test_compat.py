"""What acc_bluesky relies on in its upstream libraries, checked against the installed versions: a test here fails
loudly when an upstream release changes it. Private APIs live only in ``acc_bluesky._compat.<upstream>`` and each
has a test here (see also ``test_compat_upstream.py``: pyAT and bluesky-queueserver).
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest


# ---------------------------------------------------------------------------------------------------------
# pythonSoftIOC (acc_bluesky._compat.softioc): failing a put at its client, showing a value without processing
def test_softioc_processnotify_layout_is_the_one_of_dbnotify_h():
    """``fail_put`` writes ``processNotify.status`` through a ctypes mirror of the struct's head: the header of
    the EPICS base we run must still start the struct that way, with the same enum order."""
    import epicscorelibs.path

    from acc_bluesky._compat.softioc import NOTIFY_ERROR, ProcessNotify

    h = (Path(epicscorelibs.path.include_path) / "dbNotify.h").read_text()
    flat = re.sub(r"/\*.*?\*/", " ", h, flags=re.DOTALL)
    node = re.search(r"typedef\s+struct\s+ellCheckNode\s*\{(.*?)\}\s*ellCheckNode;", flat, re.DOTALL)
    assert node and node.group(1).split() == ["ELLNODE", "node;", "int", "isOnList;"], node
    pn = re.search(r"typedef\s+struct\s+processNotify\s*\{(.*?)\}\s*processNotify;", flat, re.DOTALL)
    assert pn, "dbNotify.h has no processNotify"
    head = " ".join(pn.group(1).split())
    assert head.startswith("ellCheckNode restartNode; void *pnotifyPvt; notifyStatus status;"), head
    status = re.search(r"typedef\s+enum\s*\{([^{}]*)\}\s*notifyStatus;", flat)
    names = [n.strip() for n in status.group(1).split(",") if n.strip()]
    assert names.index("notifyError") == NOTIFY_ERROR and names[0] == "notifyOK"
    assert [f[0] for f in ProcessNotify._fields_] == ["next", "previous", "isOnList", "pnotifyPvt", "status"]
    assert ProcessNotify.status.offset == 32 if sys.maxsize > 2 ** 32 else 16


_MINI_IOC = """
import asyncio, sys
from softioc import asyncio_dispatcher, builder, softioc
from acc_bluesky._compat.softioc import fail_put, show

P = sys.argv[1]

def validate(rec, value):
    if value > 5.0:
        fail_put(rec, 1, 11)  # MINOR, HW_LIMIT
        return False
    return True

async def slow(value):
    await asyncio.sleep(0)

def b_update(value):
    print("B on_update", value, flush=True)

def c_update(value):
    print("SHOWN", show(b, value), flush=True)

a = builder.aOut(P + "A", initial_value=1.0, validate=validate, on_update=slow, blocking=True, always_update=True)
b = builder.aOut(P + "B", initial_value=1.0, on_update=b_update)
c = builder.aOut(P + "C", initial_value=0.0, on_update=c_update)
builder.LoadDatabase()
softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher(), enable_pva=False)
print("IOC ready", flush=True)
asyncio.run(asyncio.sleep(120))
"""


@pytest.fixture
def mini_ioc(tmp_path):
    import subprocess

    from ioc_fixtures import PORTS, PREFIX, ioc_env

    script = tmp_path / "mini_ioc.py"
    script.write_text(textwrap.dedent(_MINI_IOC))
    log = tmp_path / "mini_ioc.log"
    env = ioc_env()
    env.update(EPICS_CA_SERVER_PORT=str(PORTS["spare"]), EPICS_CAS_SERVER_PORT=str(PORTS["spare"]))
    prefix = "M" + PREFIX
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), prefix], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while "IOC ready" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        yield prefix, log
    finally:
        proc.kill()
        proc.wait(10)


async def test_softioc_fail_put_fails_the_put_callback_and_show_posts_without_processing(mini_ioc):
    import asyncio

    import aioca
    import epics
    from ioc_fixtures import caget, caput

    p, log = mini_ioc
    try:
        with pytest.raises(aioca.CANothing, match="write request failed"):
            await aioca.caput(p + "A", 9.0, wait=True, timeout=10)
        assert caget(p + "A") == 1.0
        assert caget(p + "A.SEVR", as_string=True) == "MINOR" and caget(p + "A.STAT", as_string=True) == "HWLIMIT"
        await aioca.caput(p + "A", 2.0, wait=True, timeout=10)
        assert caget(p + "A") == 2.0 and caget(p + "A.SEVR", as_string=True) == "NO_ALARM"
    finally:
        aioca.purge_channel_caches()
    seen: list[float] = []
    mon = epics.PV(p + "B", callback=lambda value=None, **_: seen.append(float(value)))
    try:
        assert mon.wait_for_connection(10)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        caput(p + "C", 7.0)
        deadline = time.monotonic() + 5
        while 7.0 not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert 7.0 in seen, seen  # the monitor was posted
        assert caget(p + "B") == 7.0
        text = log.read_text()
        assert "SHOWN True" in text and "B on_update" not in text  # shown, not processed
    finally:
        mon.disconnect()


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


def test_tiled_node_lookup_on_reused_aliases_of_the_server_process():
    """``acc_bluesky._compat.tiled.reuse_node_aliases`` (server processes only): Tiled's
    ``node_from_segments(segments, root_id=0)`` still exists, and the replacement builds the same SQL (compiled
    for SQLite, literal values) for paths of 0 to 3 segments; the lookups then reuse one alias per depth."""
    import subprocess
    import sys

    code = (
        "import tiled.catalog.adapter as A\n"
        "from sqlalchemy.dialects import sqlite\n"
        "from acc_bluesky._compat.tiled import reuse_node_aliases\n"
        "def sql(st): return str(st.compile(dialect=sqlite.dialect(), compile_kwargs={'literal_binds': True}))\n"
        "paths = [[], ['a'], ['run', 'primary'], ['run', 'primary', 'orm-orbit_x']]\n"
        "before = [sql(A.node_from_segments(p, root_id=r)) for p in paths for r in (0, 7)]\n"
        "assert reuse_node_aliases(), 'tiled.catalog.adapter.node_from_segments moved'\n"
        "after = [sql(A.node_from_segments(p, root_id=r)) for p in paths for r in (0, 7)]\n"
        "assert after == before, (before, after)\n"
        "a = A.node_from_segments(['x', 'y']).get_final_froms(); b = A.node_from_segments(['z', 'w']).get_final_froms()\n"
        "assert [str(f) for f in a] == [str(f) for f in b]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # (a patch: not here)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tiled_direct_path_lookup_of_the_server_process():
    """``acc_bluesky._compat.tiled.direct_path_lookup`` (server processes only): Tiled's ``get_entry`` still has its
    signature in the modules that use it, and the replacement answers the same (an array's values, a container's
    listing, an array's structure, the 404s of a missing node and of a wrong structure family, a stream close) with
    fewer catalogue lookups (one per request instead of one per path segment)."""
    import subprocess
    import sys

    code = (
        'import tempfile, numpy as np\n'
        'import tiled.catalog.adapter as A\n'
        'from tiled.client import Context, from_context\n'
        'from acc_bluesky.data.server import build_server_app\n'
        'from acc_bluesky._compat.tiled import direct_path_lookup\n'
        'calls = []\n'
        'orig = A.CatalogNodeAdapter.lookup_adapter\n'
        'async def counting(self, segments):\n'
        '    calls.append(list(segments))\n'
        '    return await orig(self, segments)\n'
        'A.CatalogNodeAdapter.lookup_adapter = counting\n'
        'def observe():\n'
        '    d = tempfile.mkdtemp()\n'
        "    app = build_server_app(d, api_key='secret')\n"
        "    with Context.from_app(app, api_key='secret') as ctx:\n"
        '        c = from_context(ctx)\n'
        "        c.create_container('run12').create_container('p').write_array(np.arange(3.), key='x')\n"
        '        calls.clear()\n'
        '        http = ctx.http_client\n'
        "        got = [http.get(u).content for u in ('/api/v1/array/full/run12/p/x?format=application/json',\n"
        "                                              '/api/v1/search/run12/p')]\n"
        "        got.append(http.get('/api/v1/metadata/run12/p/x').json()['data']['attributes']['structure'])\n"
        '        n = len(calls)\n'
        "        codes = [(r.status_code, r.json().get('detail')) for r in (\n"
        "            http.get('/api/v1/metadata/run12/p/nope'), http.get('/api/v1/array/full/run12/p'),\n"
        "            http.get('/api/v1/metadata/nope/p'))]\n"
        "        assert http.delete('/api/v1/stream/close/run12/p/x').status_code == 200\n"
        '    return got, n, codes\n'
        'before = observe()\n'
        "assert direct_path_lookup(), 'tiled.server.dependencies.get_entry moved'\n"
        'after = observe()\n'
        'assert after[0] == before[0] and after[2] == before[2], (before, after)\n'
        'assert after[1] == 3 < before[1], (before[1], after[1])  # one lookup per request\n'
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


def test_tiled_writer_normalizer_does_not_validate_events_again(monkeypatch):
    """The recorder's normalizer validates start, descriptor and stop (through ``schema_validators``, which the
    plugin's ``emit`` uses) but not each event again: it names documents by ``DocumentNames`` (an Enum)."""
    import bluesky.plans as bp
    from bluesky import RunEngine
    from bluesky_tiled_plugins.writing import tiled_writer
    from event_model import DocumentNames
    from ophyd.sim import det

    from acc_bluesky.data.recorder import _normalizer_class

    checked = []

    class Counting:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def validate(self, doc):
            checked.append(self.name)
            self.inner.validate(doc)

    validators = {k: Counting(k.value, v) for k, v in tiled_writer.schema_validators.items()}
    monkeypatch.setattr(tiled_writer, "schema_validators", validators)
    norm = _normalizer_class()()
    got = []
    norm.subscribe(lambda name, doc: got.append(getattr(name, "value", name)))
    RunEngine(context_managers=[])(bp.count([det], 3), norm)
    assert got.count("event") == 3
    assert "event" not in checked and {"start", "descriptor", "stop"} <= set(checked), checked
    assert DocumentNames.event.value == "event"


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


# ---------------------------------------------------------------------------------------------------------
# scipy/OpenBLAS (acc_bluesky._compat.scipy): pyAT's small solves on one BLAS thread, restored afterwards
def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


def test_single_thread_blas_limits_inside_and_restores_after_nested_and_threaded_use():
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    from acc_bluesky._compat.scipy import single_thread_blas

    with threadpool_limits(limits=2, user_api="blas"):  # a known outside setting, whatever the machine's default
        assert _blas_threads() and set(_blas_threads()) == {2}
        inside: list[list[int]] = []
        with single_thread_blas():
            inside.append(_blas_threads())
            with single_thread_blas():  # nested: the inner block ending keeps the limit
                inside.append(_blas_threads())
            inside.append(_blas_threads())
        assert set(_blas_threads()) == {2}, threadpool_info()  # the outermost block restored the outside setting

        assert len(inside) == 3 and all(set(v) == {1} for v in inside), inside

        def worker():  # a Dask worker thread, the RunEngine's loop thread (their calls do not fan out anyway)
            with single_thread_blas(), single_thread_blas():
                pass

        t = threading.Thread(target=worker)
        t.start()
        t.join(10)
        assert set(_blas_threads()) == {2}, threadpool_info()  # another thread's blocks leave the main's setting


def test_twin_optics_run_on_one_blas_thread(monkeypatch):
    """The twin's linear optics (pyAT get_optics: one scipy solve per BPM) are computed inside the limit."""
    import at

    from acc_bluesky.twin import Twin

    seen: list[list[int]] = []
    real = at.get_optics

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(at, "get_optics", spy)
    twin = Twin(str(Path(__file__).parent / "profiles" / "hmba" / "profile.yaml"), seed=1)
    with threadpool_limits_2():
        q = twin.tunes()
        beta_x, _ = twin.beta()
        assert set(_blas_threads()) == {2}
    assert seen and all(set(v) == {1} for v in seen), seen
    assert np.all(np.isfinite(q)) and np.all(beta_x > 0)


def threadpool_limits_2():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=2, user_api="blas")
