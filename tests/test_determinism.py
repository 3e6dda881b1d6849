"""A seeded session is bit-identical in every process: every draw comes from named Generator streams.

The same session (a real ring and a transfer line of other facilities: generated profiles, seeded twins, readings,
trajectories, steering steps; and through the devices and the RunEngine, an ORM read back from the catalogue) runs in
two real processes with different ``PYTHONHASHSEED``: the readings and results must be identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from acc_bluesky.cli import main
from acc_bluesky.profile import load_profile
from acc_bluesky.twin.errors import ErrorModel, named_stream

HERE = Path(__file__).parent / "lattices"

#: the twin layer: the generator's profiles, seeded twins, readings, a trajectory, the analysis' steering steps
TWIN_SESSION = textwrap.dedent("""
    import hashlib, sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from acc_bluesky.cli.profile import make_profile
    from acc_bluesky.profile import load_profile
    from acc_bluesky.twin import Twin
    from acc_bluesky.analysis.orm import model_orm
    from acc_bluesky.analysis.correction import CorrectionSystem, noise_sv_cut

    ring_lattice, line_lattice, out = sys.argv[1:4]
    parts = []

    def add(name, a):
        a = np.ascontiguousarray(np.asarray(a, dtype=float))
        parts.append(f"{name}:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}")

    ring_path, _ = make_profile(ring_lattice, out + "/ring", seeds=2)
    line_path, _ = make_profile(line_lattice, out + "/line", seeds=2, twiss_in={"beta": [0.63, 9.6],
                                                                                 "alpha": [-0.32, 2.42]})
    for path in (ring_path, line_path):
        parts.append(hashlib.sha256(path.read_bytes()).hexdigest()[:16])  # the generated profile itself
        prof = load_profile(path)
        t = Twin(prof, seed=7)
        e = t.errors
        add("errors", np.concatenate([e.bpm_offset.ravel(), e.bpm_gain.ravel(), [e.dx[k] for k in sorted(e.dx)],
                                      [e.roll[k] for k in sorted(e.roll)], [e.field[k] for k in sorted(e.field)]]))
        for _ in range(3):
            add("bpms", np.concatenate(t.read_bpms()))
        add("trajectory", np.concatenate(t.trajectory(nturns=2)))
        if prof.kind == "ring":
            add("tunes", t.read_tunes())
            system = CorrectionSystem.build(model_orm(prof))
            for _ in range(2):
                dev = np.concatenate(t.read_bpms())
                cut = noise_sv_cut(system.solver, dev, bpm_noise=e.bpm_noise)
                dk, _ = system.step(dev, n_sv=cut.n_sv)
                for (name, k) in zip(system.orm.corrector_names, dk):
                    fam, i = prof.locate(name)
                    lim = prof.families[fam].spec.limits
                    t.set_setpoint(fam, float(np.clip(t.get_setpoint(fam, i) + k, lim.low, lim.high)), index=i)
                add("orbit", np.concatenate(t.orbit()))
    print(" ".join(parts))
""")

#: the same through the devices and a RunEngine: the event documents of a count and of an ORM measurement
RE_SESSION = textwrap.dedent("""
    import hashlib, sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    import acc_bluesky as ab
    from bluesky import RunEngine
    from bluesky import plans as bp
    from acc_bluesky import plans as ap

    path = sys.argv[1]
    RE = RunEngine(call_returns_result=True)
    parts = []

    def on_doc(name, doc):
        if name == "event":
            for key in sorted(doc["data"]):
                v = doc["data"][key]  # (a results event packs its small arrays in a JSON string)
                b = v.encode() if isinstance(v, str) else np.ascontiguousarray(np.asarray(v, dtype=float)).tobytes()
                parts.append(f"{key}:{hashlib.sha256(b).hexdigest()[:16]}")

    RE.subscribe(on_doc)
    m = ab.connect(ab.load_profile(path), mode="sim", seed=7)
    RE(bp.count([m.bpm, m.tune], num=2))
    RE(ap.measure_orm(m, correctors=m.families["VCM"]))
    print(" ".join(parts))
""")


def _two_processes(tmp_path, code: str, *args: str) -> list[list[str]]:
    """Run ``code`` in two real processes at once, with PYTHONHASHSEED 0 and 4242: their printed tokens."""
    script = tmp_path / "session.py"
    script.write_text(code)
    procs = []
    for hash_seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, MPLBACKEND="Agg", ACC_BLUESKY_OPERATOR="pytest")
        out = tmp_path / f"h{hash_seed}"
        out.mkdir()
        procs.append(subprocess.Popen([sys.executable, str(script), *args, str(out)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = []
    for p in procs:
        stdout, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(stdout.split())
    return outs


def test_twin_session_identical_whatever_the_hash_seed(tmp_path):
    """Generated profiles (a ring and a line of other facilities), errors, readings, trajectories, steering."""
    a, b = _two_processes(tmp_path, TWIN_SESSION, str(HERE / "siam_sps.json"), str(HERE / "als_bts.json"))
    assert len(a) == 15
    assert a == b  # bit for bit


def _devices_add_readables_in_order() -> bool:
    """Whether Orbit and TuneMonitor add x and y in a fixed order (not through ophyd-async's with-block)."""
    import inspect

    from acc_bluesky.devices.diagnostics import Orbit, TuneMonitor

    return all("add_readables([self.x, self.y]" in inspect.getsource(c.__init__) for c in (Orbit, TuneMonitor))


@pytest.mark.xfail(not _devices_add_readables_in_order(), strict=True, reason=(
    "devices (lead): ophyd-async's add_children_as_readables orders the new children by a set "
    "(dict_copy.keys() ^ new_dict.keys()), so Orbit (and TuneMonitor, Bpm) read x and y in an order that depends on "
    "PYTHONHASHSEED, and each plane's read is a fresh noisy acquisition of the twin: the noise goes to x or y "
    "depending on the process. Add the signals in a fixed order (self.add_readables([self.x, self.y], fmt)) or read "
    "both planes of one acquisition; with that order fixed this session is bit-identical (checked)"))
def test_seeded_session_identical_through_the_devices(tmp_path):
    path = tmp_path / "siam"
    assert main(["profile", "new", str(HERE / "siam_sps.json"), "-o", str(path), "--seeds", "1"]) == 0
    a, b = _two_processes(tmp_path, RE_SESSION, str(path / "profile.yaml"))
    assert len(a) > 20 and any(t.startswith("bpm-x:") for t in a)
    assert a == b


def test_streams_are_keyed_by_name_not_by_draw_order(tmp_path):
    """Adding an error group, or reordering the groups, does not change the other draws."""
    assert np.array_equal(named_stream(3, "errors", "bpm", "offset").standard_normal(4),
                          named_stream(3, "errors", "bpm", "offset").standard_normal(4))
    assert not np.array_equal(named_stream(3, "a").standard_normal(4), named_stream(3, "b").standard_normal(4))
    base = textwrap.dedent("""
        facility: X
        accelerator: Y
        energy: 6.0e9
        lattice: {package: machine_data, file: hmba.mat}
        families:
          HC: {type: hcor, select: {class: Sextupole}, field: "KickAngle[0]", calibration: {linear: 1.0e-5}}
          VC: {type: vcor, select: {class: Sextupole}, field: "KickAngle[1]", calibration: {linear: 1.0e-5}}
        errors:
          bpm: {offset: 5.0e-5, gain: 0.01}
          corrector_calibration: 0.02
          magnets:
        """)
    quad = "    - {select: {class: Quadrupole}, dx: 1.0e-4, dy: 1.0e-4}\n"
    sext = "    - {select: {class: Sextupole}, dx: 5.0e-5, roll: 1.0e-4}\n"
    models = []
    for i, groups in enumerate(([quad], [sext, quad])):
        p = tmp_path / f"p{i}" / "profile.yaml"
        p.parent.mkdir()
        p.write_text(base + "".join(groups))
        models.append(ErrorModel.generate(load_profile(p), seed=11))
    a, b = models
    assert a.dx == {k: v for k, v in b.dx.items() if k in a.dx} and len(b.dx) > len(a.dx)
    assert np.array_equal(a.bpm_offset, b.bpm_offset) and np.array_equal(a.bpm_gain, b.bpm_gain)
    assert all(np.array_equal(a.corrector_calibration[f], b.corrector_calibration[f]) for f in ("HC", "VC"))
