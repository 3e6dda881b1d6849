"""Reach-ins into upstream internals (``acc_bluesky._compat``): each must fail loudly here when upstream moves."""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path

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
