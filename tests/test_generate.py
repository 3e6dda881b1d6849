"""`acc-bluesky profile new` on every ring lattice shipped with pyAT, and on a transfer line."""

from __future__ import annotations

from pathlib import Path

import at
import machine_data
import numpy as np
import pytest

from acc_bluesky.cli import main
from acc_bluesky.machine import connect
from acc_bluesky.profile import load_profile
from acc_bluesky.profile.generate import guess_kind
from acc_bluesky.twin import Twin

MD = Path(machine_data.__file__).parent
RINGS = sorted(p.name for p in MD.iterdir() if p.suffix in (".m", ".mat") and p.stem != "errnoclass")
# errnoclass.mat is a deliberately broken file (elements without a class): the generator must refuse it clearly


def test_generator_refuses_a_broken_lattice_file_clearly(tmp_path, capsys):
    assert main(["profile", "new", str(MD / "errnoclass.mat"), "-o", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "errnoclass.mat" in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "p" / "profile.yaml").exists()


@pytest.mark.parametrize("lattice", RINGS)
def test_generator_works_on_every_shipped_ring(lattice, tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "new", str(MD / lattice), "-o", str(out)]) == 0
    prof = load_profile(out / "profile.yaml")
    assert prof.kind == "ring"
    fams = prof.families
    assert any(f.spec.type == "hcor" for f in fams.values()) and any(f.spec.type == "vcor" for f in fams.values())
    assert any(f.spec.type == "quadrupole" for f in fams.values())
    twin = Twin(prof, seed=None)
    x, y = twin.read_bpms()
    assert x.shape == (len(prof.bpm_refpts),) and np.all(np.isfinite(x))
    assert np.allclose(x, 0, atol=1e-9) or lattice == "err.mat"  # err.mat carries misalignments: an orbit
    assert np.all(np.isfinite(twin.tunes()))
    # a corrector changes the orbit: the generated families drive real lattice fields
    hc = next(n for n, f in fams.items() if f.spec.type == "hcor")
    x0 = twin.orbit()[0]
    lim = fams[hc].spec.limits.high
    twin.set_setpoint(hc, 0.25 * lim, index=0)
    assert np.max(np.abs(twin.orbit()[0] - x0)) > 1e-6


def _line(tmp_path) -> Path:
    """A FODO transfer line with BPMs and correctors, saved as a pyAT .m file."""
    cells = []
    for i in range(8):
        cells += [at.Quadrupole(f"QF{i % 2}", 0.3, 1.2), at.Monitor("BPM"), at.Corrector(f"HCOR{i}", 0.1, [0.0, 0.0]),
                  at.Drift("D", 1.5), at.Quadrupole(f"QD{i % 2}", 0.3, -1.2), at.Monitor("BPM"),
                  at.Corrector(f"VCOR{i}", 0.1, [0.0, 0.0]), at.Drift("D", 1.5)]
    line = at.Lattice(cells, name="tline", energy=3e9, periodicity=1)
    path = tmp_path / "tline.m"
    line.save(str(path))
    return path


def test_same_code_runs_on_a_transfer_line(tmp_path):
    path = _line(tmp_path)
    assert main(["profile", "new", str(path), "-o", str(tmp_path / "tl")]) == 0
    prof = load_profile(tmp_path / "tl" / "profile.yaml")
    assert prof.kind == "line" and len(prof.bpm_refpts) == 16
    assert {f.spec.type for f in prof.families.values()} >= {"hcor", "vcor", "quadrupole"}
    assert len(prof.families["HCM"]) == 8 and len(prof.families["VCM"]) == 8  # split H/V by name
    m = connect(prof, mode="sim", seed=None)
    # through the devices and a Bluesky plan, as on a ring: the corrector moves, the BPMs read the trajectory
    from bluesky import RunEngine
    from bluesky import plan_stubs as bps

    RE = RunEngine(call_returns_result=True)  # noqa: N806 - bluesky's name
    RE(bps.mv(m.families["HCM"][2], 10.0))  # 10 A * 1e-5 rad/A = 100 urad
    assert m.twin.get_setpoint("HCM", 2) == 10.0
    x = np.asarray(RE(bps.rd(m.bpm.x)).plan_result)
    ring = prof.load_lattice()
    ring[int(prof.families["HCM"].refpts[2])].KickAngle = np.array([1e-4, 0.0])
    ref = at.lattice_pass(ring, np.zeros((6, 1)), refpts=prof.bpm_refpts)[0, 0, :, 0]
    assert np.max(np.abs(x - ref)) < 1e-12 and np.max(np.abs(ref)) > 1e-5


def test_guess_kind(ebs):
    assert guess_kind(ebs.load_lattice()) == "ring"


def test_profile_show_and_list(capsys):
    assert main(["profile", "show", "ebs"]) == 0
    out = capsys.readouterr().out
    assert "224 BPMs" in out and "HST" in out
    assert main(["profile", "list"]) == 0
    assert "ebs" in capsys.readouterr().out
