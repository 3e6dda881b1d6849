"""``connect(profile, mode="tango")`` on the twin's Tango server (``acc-bluesky tango-server``, no database).

One EBS server (seed 1, faults allowed) for the module, on loopback: the same devices read and moved through Tango,
the tool plans compared with the same plans on the seed-1 twin in sim mode (they differ only in the noise sequence
and in the path: devices -> twin, or devices -> Tango -> server -> twin), limits refused at the client, states and
qualities as a Tango device reports them. A second, small server (the HMBA test ring) is killed in the middle of a
plan. Truth: a local twin with the server's seed and setpoints (noise-free BPM transform) and pytango on the same
attributes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import FailedStatus

tango = pytest.importorskip("tango")

# pytango calls its asyncio placeholder callback without awaiting it when an event arrives just after ophyd-async
# ended a monitor (pytango's behaviour, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:coroutine '__async_dummy_event_receiver':RuntimeWarning")

HMBA = str(Path(__file__).parent / "profiles" / "hmba" / "profile.yaml")
TOL = 7e-7  # 7 sigma of the 1e-7 m BPM noise
CLI = [sys.executable, "-c", "import sys; from acc_bluesky.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TangoServer:
    """``acc-bluesky tango-server PROFILE --port P --interface 127.0.0.1 ...`` in a subprocess, logging to a file."""

    def __init__(self, profile: str, *args: str):
        from acc_bluesky.profile import load_profile
        from acc_bluesky.tango import twin_device_name

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.profile = load_profile(profile)
        fd, path = tempfile.mkstemp(prefix="acc_bluesky_tango_", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        cmd = [*CLI, "tango-server", profile, "--port", str(self.port), "--interface", "127.0.0.1", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.control_name = twin_device_name(self.profile)
        self._control = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> TangoServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith("Tango server ready") for line in self.log().splitlines()):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"tango-server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"tango-server not ready within {timeout} s:\n{self.log()[-3000:]}")

    def proxy(self, device: str):
        """A pytango DeviceProxy (synchronous) of one device of this server."""
        return tango.DeviceProxy(f"tango://{self.address}/{device}#dbase=no")

    def command(self, text: str) -> str:
        if self._control is None:
            self._control = self.proxy(self.control_name)
        return self._control.command_inout("Cmd", text)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    """The EBS twin (seed 1) served as Tango devices, faults allowed, for the module."""
    srv = TangoServer("ebs", "--seed", "1", "--allow-faults")
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"the Tango server did not stop cleanly (exit code {code}):\n{srv.log()[-2000:]}"


@pytest.fixture(scope="module")
def tmachine(server):
    from acc_bluesky.machine import connect

    server.wait_ready()
    return connect("ebs", mode="tango", address=server.address, timeout=10.0)


@pytest.fixture
def reset(server, tmachine):
    """The server back to design setpoints, no anomaly, beam injected (before and after the test)."""
    server.command("reset")
    yield server
    if server.proc.poll() is None:
        server.command("reset")


@pytest.fixture(scope="module")
def plain_RE():  # noqa: N802 - the bluesky name
    from bluesky import RunEngine

    return RunEngine(call_returns_result=True, context_managers=[])


@pytest.fixture(scope="module")
def mcat(session_catalog_dir):
    """One RunEngine for the module on the session's catalogue (opening a catalogue costs seconds)."""
    from acc_bluesky.data import make_run_engine, open_catalog

    d = session_catalog_dir
    return make_run_engine(catalog_dir=d, progress=False), open_catalog(catalog_dir=d)


@pytest.fixture(scope="module")
def sim(_ebs_machine):
    """The session's EBS sim machine, seed 1 (``both`` resets it: connecting EBS again costs seconds)."""
    return _ebs_machine


@pytest.fixture
def both(sim, tmachine, reset, mcat):
    """Run a plan factory ``f(machine)`` on the sim machine and on the Tango server; returns the two runs."""
    re, cat = mcat
    sim.twin.reset()

    def run(factory):
        return [cat[re(factory(m)).plan_result] for m in (sim, tmachine)]

    return run


def expected(**setpoints) -> tuple[np.ndarray, np.ndarray]:
    from acc_bluesky.twin import Twin

    t = Twin("ebs", seed=1)
    t.orbit()  # the seeded machine's orbit first, as on the server
    for fam, d in setpoints.items():
        for i, v in d.items():
            t.set_setpoint(fam, v, i)
    return t.errors.bpm_transform(*t.orbit())


def rd(RE, *signals):  # noqa: N803
    def plan():
        out = []
        for s in signals:
            out.append((yield from bps.rd(s)))
        return out

    return RE(plan()).plan_result


def reading(signal) -> dict:
    return next(iter(call_in_bluesky_event_loop(signal.read()).values()))


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


# ---------------------------------------------------------------------------------------------------------
def test_devices_connect_and_read_the_twin_through_tango(server, mcat, sim, tmachine, reset, plain_RE):
    # (the catalogue and the sim machine of the later tests are made while the server starts)
    from acc_bluesky.devices.backends.tango import magnet_key, tango_names

    m = tmachine
    assert m.mode == "tango" and m.twin is None and len(m.bpm) == 224
    x, y, xb = rd(plain_RE, m.bpm.x, m.bpm.y, m.bpm.channel[100].x)
    xe, ye = expected()
    assert np.max(np.abs(x - xe)) < TOL and np.max(np.abs(y - ye)) < TOL
    assert xb == pytest.approx(xe[100], abs=TOL)
    # units, limits and the source from the attribute configuration; names from the profile's templates
    key = next(iter(call_in_bluesky_event_loop(m.hcor[0].setpoint.describe()).values()))
    name = tango_names(m.profile)[magnet_key("HST", 0, "setpoint")]
    assert name.split("/")[2] == m.hcor.names[0]
    assert key["units"] == "A" and key["source"] == f"tango://{server.address}/{name}#dbase=no"
    assert key["limits"]["control"] == {"low": -8.0, "high": 8.0}
    d = call_in_bluesky_event_loop(m.bpm.describe())
    assert d["bpm-x"]["units"] == "m" and d["bpm-x"]["shape"] == [224]
    cur = next(iter(call_in_bluesky_event_loop(m.beam.current.describe()).values()))
    assert cur["units"] == "A" and cur["limits"]["alarm"]["low"] == pytest.approx(1e-3)
    assert reading(m.beam.current)["alarm_severity"] == 0
    # moves through the devices show in the orbit, and on the attributes any Tango client reads
    sp = np.zeros(224)
    sp[[5, 50]] = [0.3, -0.4]

    def plan():
        yield from bps.mv(m.hcor[10], 1.5, m.vcor[20], -0.5)
        x = yield from bps.rd(m.bpm.x)
        yield from bps.mv(m.vcor, sp)
        return x, (yield from bps.rd(m.vcor[5].setpoint)), (yield from bps.rd(m.hcor[10].strength))

    x, v5, kick = plain_RE(plan()).plan_result
    xe, _ = expected(HST={10: 1.5}, VST={20: -0.5})
    assert np.max(np.abs(x - xe)) < TOL and kick == pytest.approx(1.5 * 5e-5) and v5 == 0.3
    names = tango_names(m.profile)
    dev, attr = names[magnet_key("HST", 10, "setpoint")].rsplit("/", 1)
    assert server.proxy(dev).read_attribute(attr).value == 1.5
    dev, attr = names[magnet_key("VST", 5, "setpoint")].rsplit("/", 1)
    assert server.proxy(dev).read_attribute(attr).w_value == 0.3  # a family write moves the single setpoints too
    assert server.proxy(dev).state() == tango.DevState.ON


def test_out_of_limit_write_fails_at_the_client(server, tmachine, reset, plain_RE):
    from acc_bluesky.devices.backends.tango import TangoWriteRefused, magnet_key, tango_names
    from acc_bluesky.profile import LimitError

    m = tmachine
    ctl = server.proxy(server.control_name)
    n0 = ctl.read_attribute("Refused").value
    # the device refuses before anything moves
    with pytest.raises(FailedStatus) as info:
        plain_RE(bps.mv(m.hcor[3], 9.0))
    assert isinstance(info.value.__cause__, LimitError) and m.hcor.names[3] in str(info.value.__cause__)
    # the signal itself (past the device's check): the server refuses, the client says which limit
    sig = m.hcor[3].setpoint

    async def put(value):
        await sig.set(value)

    with pytest.raises(TangoWriteRefused) as info:
        call_in_bluesky_event_loop(put(9.0))
    msg = str(info.value)
    assert info.value.reason == "API_WAttrOutsideLimit" and "above the maximum authorized" in msg, msg
    assert m.hcor.names[3] in msg and "limits are [-8.0, 8.0] A" in msg, msg
    name = tango_names(m.profile)[magnet_key("HST", 3, "setpoint")]
    dev, attr = name.rsplit("/", 1)
    with pytest.raises(tango.DevFailed) as raw:  # any Tango client
        server.proxy(dev).write_attribute(attr, -8.5)
    assert raw.value.args[0].reason == "API_WAttrOutsideLimit"
    # a refusal is told from a dead server by asking the server (it answers a ping)
    assert call_in_bluesky_event_loop(m.backend.answers(m.backend.trl(name))) is True
    call_in_bluesky_event_loop(put(-8.0))  # the limit itself passes
    assert rd(plain_RE, m.hcor[3].readback) == [-8.0]
    with pytest.raises(tango.DevFailed) as raw:  # NaN too
        server.proxy(dev).write_attribute(attr, float("nan"))
    assert raw.value.args[0].reason == "API_WAttrOutsideLimit"
    # a family array of the wrong length passes Tango's checks: the server refuses it and says so in LastError
    fdev, fattr = tango_names(m.profile)["HST:setpoints"].rsplit("/", 1)
    with pytest.raises(tango.DevFailed) as raw:
        server.proxy(fdev).write_attribute(fattr, np.zeros(10))
    err = raw.value.args[0]
    assert err.reason == "ACC_WriteRefused" and "expected exactly 224 setpoints [A], got 10" in err.desc, err.desc
    assert ctl.read_attribute("Refused").value == n0 + 1 and fattr in ctl.read_attribute("LastError").value
    assert rd(plain_RE, m.hcor[3].setpoint) == [-8.0]


def test_states_qualities_and_alarms_as_a_tango_device_reports_them(server, tmachine, reset, plain_RE):
    from acc_bluesky.devices.backends.tango import bpm_key, magnet_key, tango_names

    m = tmachine
    names = tango_names(m.profile)
    dev = lambda key: server.proxy(names[key].rsplit("/", 1)[0])  # noqa: E731
    assert "ok: dead_bpm" in server.command("dead_bpm 5")
    assert dev(bpm_key(4, "x")).state() == tango.DevState.FAULT
    r = reading(m.bpm.channel[4].x)
    assert np.isnan(r["value"]) and r["alarm_severity"] == 3  # INVALID: Tango sends no value, the device reads NaN
    r = reading(m.bpm.x)
    assert np.isnan(r["value"][4]) and np.isfinite(np.delete(r["value"], 4)).all() and r["alarm_severity"] == 1
    assert dev("orbit:x").state() == tango.DevState.ALARM and "1 BPMs read nothing" in dev("orbit:x").status()
    server.command("trip QF2")
    assert dev("QF2:setpoints").state() == tango.DevState.FAULT
    assert dev(magnet_key("QF2", 0, "setpoint")).state() == tango.DevState.FAULT
    assert "tripped" in dev(magnet_key("QF2", 0, "setpoint")).status()
    assert rd(plain_RE, m.quad["QF2"][0].readback) == [0.0]
    ctl = server.proxy(server.control_name)
    assert ctl.state() == tango.DevState.ALARM and "QF2" in ctl.read_attribute("Anomalies").value
    server.command("lose_beam")
    r = reading(m.beam.current)
    assert r["value"] == 0.0 and r["alarm_severity"] == 2  # below min_alarm: ALARM quality
    assert dev("beam:current").state() == tango.DevState.ALARM
    x, q = reading(m.bpm.x), reading(m.tune.x)
    assert np.isnan(x["value"]).all() and x["value"].shape == (224,) and x["alarm_severity"] == 3
    assert np.isnan(q["value"]) and q["alarm_severity"] == 3
    server.command("clear")
    assert dev("beam:current").state() == tango.DevState.ON and ctl.state() == tango.DevState.ON
    assert dev(magnet_key("QF2", 0, "setpoint")).state() == tango.DevState.ON


def test_measured_orm_equals_the_sim_one_within_noise(both, sim):
    from acc_bluesky.analysis import OrbitResponse
    from acc_bluesky.plans import measure_orm

    hst, vst = sim.family("HST").names, sim.family("VST").names
    cors = [hst[0], hst[119], vst[1], vst[129]]
    s, t = both(lambda m: measure_orm(m, correctors=cors))
    rs, rt = OrbitResponse.from_run(s), OrbitResponse.from_run(t)
    assert t.metadata["start"]["mode"] == "tango" and "seed" not in t.metadata["start"]
    assert rt.corrector_names == cors and rt.matrix.shape == (448, 4)
    # BPM noise 0.1 um on orbit changes of ~100 um per 0.2 A step (bipolar): a few 1e-3 relative at most
    assert rel(rt.matrix, rs.matrix) <= 5e-3, rel(rt.matrix, rs.matrix)


def test_correct_orbit_reaches_the_sim_result(both, server, tmachine):
    from acc_bluesky.data import read_results
    from acc_bluesky.devices.backends.tango import tango_names
    from acc_bluesky.plans import correct_orbit

    s, t = both(lambda m: correct_orbit(m, orm="model", max_iter=2, figure_dir=False))
    rs, rt = read_results(s), read_results(t)
    assert t.metadata["stop"]["exit_status"] == "success"
    for plane in "xy":
        assert rt[f"rms_{plane}_after"] < 0.2 * rt[f"rms_{plane}_before"]
        assert rt[f"rms_{plane}_before"] == pytest.approx(rs[f"rms_{plane}_before"], rel=0.01)
        assert rt[f"rms_{plane}_after"] == pytest.approx(rs[f"rms_{plane}_after"], rel=0.05, abs=2e-7)
    names = tango_names(tmachine.profile)
    for fam in ("HST", "VST"):
        assert rel(rt[f"{fam}_correction"], rs[f"{fam}_correction"]) <= 0.02, fam
        dev, attr = names[f"{fam}:setpoints"].rsplit("/", 1)  # what any Tango client sees (started from zero)
        assert np.array_equal(server.proxy(dev).read_attribute(attr).value, np.asarray(rt[f"{fam}_correction"]))


def test_correct_tune_reaches_the_sim_result(both, sim):
    from acc_bluesky.analysis import TuneCorrection
    from acc_bluesky.plans import correct_tune

    q = sim.twin.tunes()
    tgt = (round(float(q[0]) + 0.005, 4), round(float(q[1]) - 0.005, 4))
    s, t = both(lambda m: correct_tune(m, tgt, response="model", figure_dir=False))
    cs, ct = TuneCorrection.from_run(s), TuneCorrection.from_run(t)
    assert ct.converged and np.all(np.abs(ct.after - tgt) <= 1e-3)
    assert ct.families == cs.families
    assert np.allclose(ct.delta_hw, cs.delta_hw, rtol=0.02)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_queue_in_tango_mode_measures_on_the_server(server, tmachine, reset, tmp_path, session_catalog_dir):
    """``start_queue_server(mode="tango", address=...)``: the worker drives the Tango server; its ORM is the twin's
    (seed 1, the server's errors: orbit differences of a local twin, noise-free BPM transform) within the noise."""
    from acc_bluesky.analysis import OrbitResponse
    from acc_bluesky.data import open_catalog
    from acc_bluesky.queue import run_queue, start_queue_server, submit
    from acc_bluesky.twin import Twin

    cors = [tmachine.family("HST").names[9], tmachine.family("VST").names[9]]
    qs = start_queue_server("ebs", mode="tango", address=server.address, catalog_dir=session_catalog_dir,
                            run_dir=tmp_path / "run", timeout=200.0)
    try:
        api = qs.api(timeout=10.0)
        try:
            (item,) = run_queue(api, [submit(api, "measure_orm", {"correctors": cors, "delta": 0.5})], timeout=180)
        finally:
            api.close()
    finally:
        qs.stop()
    assert item["result"]["exit_status"] == "completed", item["result"]["msg"]
    run = open_catalog(catalog_dir=session_catalog_dir)[item["result"]["run_uids"][0]]
    assert run.metadata["start"]["mode"] == "tango" and run.metadata["start"]["tool"] == "orbit_response"
    live = OrbitResponse.from_run(run)
    t = Twin("ebs", seed=1)
    truth = []
    for fam, i in (("HST", 9), ("VST", 9)):
        orbits = []
        for v in (0.5, -0.5):
            t.set_setpoint(fam, v, i)
            orbits.append(np.concatenate(t.errors.bpm_transform(*t.orbit())))
        t.set_setpoint(fam, 0.0, i)
        truth.append((orbits[0] - orbits[1]) / 1.0)
    assert rel(live.matrix_hw, np.array(truth).T) < 5e-3, rel(live.matrix_hw, np.array(truth).T)


def test_tango_names_come_from_the_templates_and_refuse_clashes(tmp_path):
    """No server: the names table of the profile's templates, and the refusals of names Tango cannot serve."""
    import yaml

    from acc_bluesky.devices.backends.tango import bpm_key, magnet_key, may_share, tango_names
    from acc_bluesky.profile import ProfileError, load_profile

    prof = load_profile(HMBA)
    names = tango_names(prof, domain="ring")
    fam = prof.families["QF1"]
    assert names[magnet_key("QF1", 1, "setpoint")] == f"ring/QF1/{fam.device_names[1]}/CurrentSetpoint"
    assert names[bpm_key(0, "y")] == f"ring/bpm/{prof.bpm_names[0]}/Y"
    assert names["rf:frequency"] == names["rf:frequency_rb"] and may_share("HST:001:setpoint", "HST:001:readback")
    assert not may_share("HST:001:setpoint", "HST:002:readback")

    def profile_with(**controls):
        spec = yaml.safe_load(Path(HMBA).read_text())
        spec["controls"].update(controls)
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}" / "profile.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    with pytest.raises(ValueError, match=r"'sim/mag/1/Sp' is named by both 'HST:001:setpoint' and '\w+:001:setpoint'"):
        tango_names(load_profile(profile_with(tango_magnet_setpoint="{domain}/mag/{index}/Sp")))
    with pytest.raises(ValueError, match=r"named by both 'BPM:001:x' and 'BPM:001:y' \(Tango names are case-ins"):
        tango_names(load_profile(profile_with(tango_bpm_y="{domain}/bpm/{device}/x")))
    with pytest.raises((ProfileError, ValueError), match=r"controls.tango_orbit_x.*4 parts"):
        load_profile(profile_with(tango_orbit_x="{domain}/orbit/X"))
    with pytest.raises((ProfileError, ValueError), match=r"controls.tango_tune_x.*placeholders of a global template"):
        load_profile(profile_with(tango_tune_x="{domain}/tune/{device}/Qx"))


# ---------------------------------------------------------------------------------------------------------
# the server dies in the middle of a plan
def _chain(err: BaseException) -> list[BaseException]:
    out, todo, seen = [], [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


@pytest.fixture
def facility_profile(tmp_path):
    """The HMBA test ring named as a facility might: its own domain and templates, one read-write ``Current``
    attribute per supply (read = delivered, write value = setpoint), BPMs numbered in their device names."""
    import yaml

    spec = yaml.safe_load(Path(HMBA).read_text())
    spec["controls"].update({
        "tango_domain": "hm",
        "tango_magnet_setpoint": "{domain}-mag/{family}/{device}/Current",
        "tango_magnet_readback": "{domain}-mag/{family}/{device}/Current",
        "tango_setpoints_from_write_value": True,
        "tango_bpm_x": "{domain}-diag/bpm-{index}/main/SA_HPosition",
        "tango_bpm_y": "{domain}-diag/bpm-{index}/main/SA_VPosition",
    })
    path = tmp_path / "hmba_facility" / "profile.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_server_killed_mid_plan_fails_the_run_and_reports_what_was_not_restored(mcat, facility_profile):
    from acc_bluesky.data import read_stream
    from acc_bluesky.devices.backends.tango import TangoUnreachable, bpm_key, magnet_key, tango_names
    from acc_bluesky.machine import connect
    from acc_bluesky.plan_stubs.machine import RestoreError
    from acc_bluesky.plans import measure_orm

    srv = TangoServer(facility_profile, "--seed", "1", "--allow-faults").wait_ready()
    try:
        RE, catalog = mcat  # noqa: N806
        m = connect(facility_profile, mode="tango", address=srv.address, timeout=3.0)
        # a facility's names and a supply with one attribute: the setpoint reads its write value
        names = tango_names(m.profile)
        hst0 = names[magnet_key("HST", 0, "setpoint")]
        assert hst0 == f"hm-mag/HST/{m.hcor.names[0]}/Current" == names[magnet_key("HST", 0, "readback")]
        assert names[bpm_key(4, "y")] == "hm-diag/bpm-5/main/SA_VPosition"
        RE(bps.mv(m.hcor[0], 1.0))
        srv.command("stuck HST 1")
        RE(bps.mv(m.hcor[0], 2.0))
        assert rd(RE, m.hcor[0].setpoint, m.hcor[0].readback) == [2.0, 1.0]
        raw = srv.proxy(hst0.rsplit("/", 1)[0]).read_attribute("Current")
        assert (raw.value, raw.w_value) == (1.0, 2.0)
        srv.command("clear")
        RE(bps.mv(m.hcor[0], 0.0))
        assert rd(RE, m.hcor[0].readback) == [0.0]
        # a profile whose units differ from the attributes' is refused at connection, naming both
        import yaml

        other = Path(facility_profile).parent.parent / "hmba_ma" / "profile.yaml"
        other.parent.mkdir()
        spec = yaml.safe_load(Path(facility_profile).read_text())
        spec["families"]["QF1"]["units"] = "mA"
        other.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConnectionError, match=r"QF1.*the attribute is in 'A', the profile expects 'mA'"):
            connect(str(other), mode="tango", address=srv.address, timeout=3.0)
        # the server dies in the middle of an ORM
        cors = m.family("HST").names + m.family("VST").names
        starts, events = [], []

        def on_doc(name, doc):
            if name == "start":
                starts.append(doc["uid"])
            elif name == "event":
                events.append(doc)
                if len(events) == 3:  # the server crashes once 3 correctors are measured
                    threading.Thread(target=srv.kill).start()

        token = RE.subscribe(on_doc)
        t0 = time.monotonic()
        try:
            with pytest.raises(Exception) as info:
                RE(measure_orm(m, correctors=cors))
        finally:
            RE.unsubscribe(token)
        elapsed = time.monotonic() - t0
    finally:
        srv.kill()
    # a write that fails on a dead server is called unreachable, whatever Tango's reason: the server is asked
    assert call_in_bluesky_event_loop(m.backend.answers(m.backend.trl(hst0))) is False
    chain = _chain(info.value)
    top = info.value
    assert isinstance(top, (TangoUnreachable, FailedStatus, RestoreError)), repr(top)
    assert srv.address in str(top), str(top)
    unreachable = [e for e in chain if isinstance(e, TangoUnreachable)]
    assert unreachable and all(f"tango://{srv.address}/" in trl for e in unreachable for trl in e.trls)
    # what could not be put back is reported: each failed item with its target and its attribute
    restore = [e for e in chain if isinstance(e, RestoreError)]
    assert restore, "the restore failures are not reported"
    failed = restore[0].failed
    assert "HST" in failed and np.array_equal(failed["HST"][0], np.zeros(len(m.family("HST"))))
    assert all(src.startswith(f"{srv.address}/") for _, src, _ in failed.values()), failed
    assert elapsed < 30
    run = catalog[starts[0]]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail" and srv.address in stop["reason"], stop
    data = read_stream(run)
    assert np.asarray(data["orm-orbit_plus"]).shape[0] >= 3
    assert np.all(np.isfinite(np.asarray(data["orm-orbit_plus"])[:3]))
