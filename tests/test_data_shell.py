"""The IPython session: its namespace, and a real IPython process running a plan into the catalogue."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from bluesky.callbacks.best_effort import BestEffortCallback
from event_model import DocumentNames
from data_fixtures import _isolated_data_env  # noqa: F401 - fixtures

from acc_bluesky.cli.shell import build_namespace, has_display
from acc_bluesky.data import RunEngine, open_catalog, read_stream

HMBA = os.path.join(os.path.dirname(__file__), "profiles", "hmba", "profile.yaml")


@pytest.fixture(scope="module")
def module_catalog_dir(session_catalog_dir):
    """The session's catalogue folder (its server already up: a server of the module's own costs a start); the
    sessions' runs are read back by uid."""
    return session_catalog_dir


def test_namespace_without_machine(module_catalog_dir, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert has_display() == (sys.platform in ("darwin", "win32"))
    ns = build_namespace(machine=False, catalog_dir=module_catalog_dir, progress=True)
    RE = ns["RE"]
    assert isinstance(RE, RunEngine) and ns["m"] is None
    assert ns["cat"] is RE.catalog is not None
    assert RE.waiting_hook is not None  # progress bars
    assert isinstance(ns["bec"], BestEffortCallback)
    RE.dispatcher.process(DocumentNames.start, {"uid": "0" * 36, "time": 0.0, "scan_id": 7})
    assert "Transient Scan ID: 7" in capsys.readouterr().out  # the BestEffortCallback is subscribed
    assert ns["bec"]._plots_enabled is has_display()
    assert ("ap" in ns) == (importlib.util.find_spec("acc_bluesky.plans") is not None)
    for name in ("bp", "bps", "bpp", "np", "find_runs", "read_results", "read_stream", "tool_metadata"):
        assert name in ns


SESSION = textwrap.dedent(
    """
    from ophyd_async.core import soft_signal_rw, init_devices
    with init_devices():
        orbit = soft_signal_rw(np.ndarray, np.linspace(-1e-4, 1e-4, 224), units="m")

    md = dict(facility="ESRF", accelerator="EBS", mode="sim", seed=1, tool="orbit_snapshot")
    md["profile"] = {"name": "ebs", "sha256": "0" * 64}
    md["lattice"] = {"file": "esrf.m", "sha256": "0" * 64}
    uid = RE(bp.count([orbit], 3, md=md))
    print("RESULT", uid, read_stream(cat[uid])["orbit"].shape)
    exit
    """
)


def test_ipython_session_runs_a_plan(module_catalog_dir):
    env = dict(os.environ, ACC_BLUESKY_CATALOG=str(module_catalog_dir), PYTHONUNBUFFERED="1")
    env.pop("DISPLAY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "acc_bluesky.cli.shell", "--no-machine", "--simple-prompt", "--quiet"],
        input=SESSION, capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = [line for line in proc.stdout.splitlines() if "RESULT" in line]
    assert result, proc.stdout + proc.stderr
    uid = result[0].split("RESULT")[1].split()[0]
    assert result[0].rstrip().endswith("(3, 224)")
    assert "Transient Scan ID" in proc.stdout  # BestEffortCallback's live table
    run = open_catalog(catalog_dir=module_catalog_dir)[uid]
    start = run.metadata["start"]
    assert start["tool"] == "orbit_snapshot" and start["operator"] == "tester"
    assert start["software"]["bluesky"] and start["license"] == "CC-BY-4.0"
    assert read_stream(run)["orbit"].shape == (3, 224)


MACHINE_SESSION = textwrap.dedent(
    """
    m.twin.set_setpoint("HST", 2.0, 3)
    uid = RE(ap.measure_orm(m, correctors=[m.profile.families[f].device_names[0] for f in ("HST", "VST")]))
    r = ab.analysis.OrbitResponse.from_run(cat[uid])
    c = RE(bp.count([m.bpm, m.beam], 2))  # no metadata typed: FAIR by default, tool from the plan's name
    x = read_stream(cat[c])["bpm-x"]
    st = cat[c].metadata["start"]
    print("RESULT", r.matrix.shape, bool(np.allclose(x[0], m.twin.read_bpms()[0], atol=1e-6)),
          float(read_stream(cat[c])["beam-current"][0]) > 0.1, st["tool"], st["seed"], st["facility"])
    exit
    """
)


def test_ipython_session_with_the_machine(module_catalog_dir):
    """``acc-bluesky shell PROFILE --seed 1``: a real IPython process measures an ORM on the twin and counts the live
    orbit with bluesky's own plan; both runs are read back from the catalogue. (The small ring, 10 BPMs: the session
    is what is tested; EBS's shipped startup file runs in IPython below.)"""
    env = dict(os.environ, ACC_BLUESKY_CATALOG=str(module_catalog_dir), PYTHONUNBUFFERED="1")
    env.pop("DISPLAY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "acc_bluesky.cli.shell", HMBA, "--seed", "1", "--simple-prompt", "--quiet"],
        input=MACHINE_SESSION, capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = [line for line in proc.stdout.splitlines() if "RESULT" in line]
    assert result and result[0].split("RESULT")[1].split() == ["(20,", "2)", "True", "True", "count", "1", "ESRF"], \
        proc.stdout[-3000:] + proc.stderr[-3000:]


STARTUP_SESSION = textwrap.dedent(
    """
    %run -i {startup}
    print("NAMES", sorted(k for k in ("RE", "m", "cat", "bec", "ap", "bp", "measure_orm") if k in globals()))
    uid = RE(ap.measure_tune(m))
    print("RESULT", cat[uid].metadata["start"]["tool"], cat[uid].metadata["stop"]["exit_status"])
    exit
    """
)



def test_profile_startup_file_in_ipython(module_catalog_dir):
    """``profiles/ebs/startup.py`` run in IPython gives the RunEngine, the machine, the catalogue and the plans."""
    from acc_bluesky.profile import load_profile

    startup = load_profile("ebs").path.parent / "startup.py"
    env = dict(os.environ, ACC_BLUESKY_CATALOG=str(module_catalog_dir), ACC_BLUESKY_SEED="1",
               PYTHONUNBUFFERED="1")
    env.pop("DISPLAY", None)
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--quick"],
        input=STARTUP_SESSION.format(startup=startup), capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    names = [line for line in proc.stdout.splitlines() if "NAMES" in line]
    assert names and all(k in names[0] for k in ("'RE'", "'m'", "'cat'", "'bec'", "'ap'", "'bp'", "'measure_orm'")), \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any("RESULT tune success" in line for line in proc.stdout.splitlines()), proc.stdout[-3000:]
