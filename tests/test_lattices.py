"""Acceptance over six real lattices of five facilities (none from pyAT's machine_data), from generated profiles.

Every profile is written by ``acc-bluesky profile new`` with no hand edit (``tests/lattices/README.md``: sources,
commits, licences, and what the generator must find in each). The tools run through the public API
(``ab.connect``, ``ab.make_run_engine(catalog_dir=tmp)``, ``acc_bluesky.plans``); the truth is pyAT on the twin's
errored lattice (``machine.twin.ring``) and the injected errors (BPM gains/rolls, corrector calibrations).

Criteria (issue 10): ORM within 1 % of pyAT, orbit (line: trajectory) reduced >= 10x or to 1.5x the BPM-offset
floor, tunes within 1e-3 of a target 0.01 away, chromaticities within 0.2 of a target 1 away (rings).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import at
import numpy as np
import pytest

import acc_bluesky as ab
from acc_bluesky import plans as ap
from acc_bluesky.analysis import Dispersion, OrbitResponse, rf_frequency_of
from acc_bluesky.analysis._common import rms
from acc_bluesky.analysis.correction import (
    INJECTION_KNOB_LIMITS,
    CorrectionSystem,
    correction_floor,
    judge_step,
    limit_step,
    n_sv_within_limits,
    noise_sv_cut,
)
from acc_bluesky.analysis.orm import model_orm
from acc_bluesky.analysis.trajectory import model_trajectory_response
from acc_bluesky.cli import main

HERE = Path(__file__).parent / "lattices"
BTS_TWISS = ["beta=0.63,9.6", "alpha=-0.32,2.42", "dispersion=0.074,0.018,0,0"]  # MML updateatindex.m

#: lattice -> (BPMs, H correctors, V correctors, elements excluded) that the generator must find (README)
EXPECT = {
    "sls2": (135, 115, 115, 852),
    "petra3_p3x_v24": (252, 312, 295, 30 + 26 + 1),
    "nsls2_2014March": (180, 180, 180, 540),
    "als_loco_3sb_disp_nuy9_122bpms": (122, 97, 97, 8),
    "siam_sps": (24, 16, 12, 0),
    "als_bts": (6, 9, 9, 7),
}
RINGS = ["sls2", "petra3_p3x_v24", "nsls2_2014March", "als_loco_3sb_disp_nuy9_122bpms", "siam_sps"]
ALL = [*RINGS, "als_bts"]
def _names_resolved() -> bool:
    """Whether the plans' corrector lookup takes the one-string device names (``HST_004``)."""
    from acc_bluesky.analysis._common import corrector_table
    from acc_bluesky.profile import load_profile

    prof = load_profile("ebs")
    try:
        corrector_table(prof, [prof.families["HST"].device_names[3]])
    except KeyError:
        return False
    return True


NAMES_XFAIL = ("plan-level: device names are one string now (HCM_001, ARS01_MCOX_0410); the plan must resolve them "
               "with profile.locate(name) -> (family, index) instead of name.rpartition(':') (analysis._common."
               "corrector_table for measure_orm(correctors=[...]); correct_orbit's grouping of the ORM's correctors). "
               "With those two lookups changed, every test here passes (checked)")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """lattice -> path of its generated profile (``acc-bluesky profile new``, exit 0)."""
    out = {}
    root = tmp_path_factory.mktemp("generated")
    for lat in ALL:
        args = ["profile", "new", str(HERE / f"{lat}.json"), "-o", str(root / lat), "--seeds", "3"]
        if lat == "als_bts":
            args += ["--twiss-in", *BTS_TWISS]
        assert main(args) == 0, lat
        out[lat] = root / lat / "profile.yaml"
    return out


_MACHINES: dict[str, object] = {}


def machine_of(generated, lat: str):
    """One seeded machine per lattice for the module (each test leaves it where the tool put it)."""
    if lat not in _MACHINES:
        _MACHINES[lat] = ab.connect(ab.load_profile(generated[lat]), mode="sim", seed=1)
    return _MACHINES[lat]


@pytest.fixture(scope="module")
def catalog_dir(session_catalog_dir):
    return session_catalog_dir  # (runs read back by uid: the session's catalogue, its server already up)


@pytest.fixture(scope="module")
def run_engine(catalog_dir):
    re = ab.make_run_engine(catalog_dir=catalog_dir, progress=False)
    yield re
    if re.state != "idle":
        re.halt()


def _offset_floor(twin) -> float:
    off = twin.errors.bpm_offset
    return float(np.hypot(rms(off[:, 0]), rms(off[:, 1])))


def _true_rms(twin) -> float:
    x, y = twin.orbit()
    return float(np.hypot(rms(x), rms(y)))


# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lat", ALL)
def test_generator_finds_bpms_correctors_and_exclusions(generated, lat, capsys):
    """The generated profile: the README's BPMs and correctors per plane, the non-BPMs and non-steerers excluded
    (listed with why), one line per family, and `profile check` reports it usable with a closed orbit."""
    prof = ab.load_profile(generated[lat])
    nb, nh, nv, nexcl = EXPECT[lat]
    assert len(prof.bpm_refpts) == nb
    fams = prof.families
    assert sum(len(f) for f in fams.values() if f.spec.type == "hcor") == nh
    assert sum(len(f) for f in fams.values() if f.spec.type == "vcor") == nv
    assert sum(e.count for e in prof.spec.generated.excluded) == nexcl
    text = generated[lat].read_text()
    assert "&" not in text and "*id" not in text  # no YAML anchors or aliases
    block = text.split("\nfamilies:\n")[1].splitlines()
    fam_lines = block[:next(i for i, ln in enumerate(block) if not ln.startswith("  "))]
    assert len(fam_lines) == len(fams) and all(ln.rstrip().endswith("}") for ln in fam_lines)
    names = prof.bpm_names + [n for f in fams.values() for n in f.device_names]
    assert len(set(names)) == len(names)
    assert main(["profile", "check", str(generated[lat])]) == 0
    out = capsys.readouterr().out
    assert f"BPMs: {nb}" in out and f"correctors: {nh} horizontal, {nv} vertical" in out and "usable: yes" in out
    assert ("closed orbit" if lat != "als_bts" else "trajectory through the line") + " at the default errors" in out


def test_families_by_name_stem_and_equal_strength(generated):
    """SLS 2.0 names every magnet per device: families come from the name stems split by equal design strength,
    and the device names are the lattice's own."""
    prof = ab.load_profile(generated["sls2"])
    quads = prof.families_of_type("quadrupole")
    assert 20 < len(quads) < 60  # not 640 one-magnet families
    ring = prof.load_lattice()
    for fam in quads.values():  # each family: one stem, one design strength
        k = {round(float(ring[int(i)].PolynomB[1]), 9) for i in fam.refpts}
        assert len(k) == 1
        assert len({n.split("_")[1] for n in fam.element_names}) == 1
    assert prof.families["HCM"].device_names[0] == "ARS01_MCOX_0410"
    assert prof.bpm_names[0] == "ARS01_DBPM_0390"
    assert all(n.startswith("ARS") and "_MCOY_" in n for n in prof.families["VCM"].device_names)


@pytest.mark.parametrize("lat", ["sls2", "nsls2_2014March"])
def test_ring_without_cavity_gets_an_rf_near_500_mhz(generated, lat):
    """No cavity in the file: the generator writes the harmonic nearest 500 MHz (was h = 1: the revolution
    frequency, 378.5 kHz on NSLS-II, where a 20 Hz step is dp/p ~ 0.15), frequency limits of +-1e-4 and a WARNING
    (header, generated.warnings, report); the twin runs at that frequency."""
    prof = ab.load_profile(generated[lat])
    frev = prof.load_lattice().revolution_frequency
    h = prof.spec.rf.harmonic_number
    assert h == round(500e6 / frev) and prof.rf_harmonic_number == (h, "profile")
    f = prof.rf_nominal_frequency
    assert f == pytest.approx(h * frev, rel=1e-12) and abs(f - 500e6) <= frev / 2
    lim = prof.spec.rf.frequency_limits
    assert lim.low == pytest.approx(f * (1 - 1e-4), rel=1e-12) and lim.high == pytest.approx(f * (1 + 1e-4), rel=1e-12)
    text = generated[lat].read_text()
    assert f"# WARNING: RF: THE LATTICE HAS NO CAVITY: harmonic number {h} assumed" in text
    assert any("set rf.harmonic_number" in w for w in prof.spec.generated.warnings)
    assert not any("4D tools do not depend on it" in n for n in prof.spec.generated.notes)
    assert machine_of(generated, lat).twin.rf_nominal_frequency == f
    assert rf_frequency_of(prof.load_lattice(), prof) == pytest.approx(f, rel=1e-12)


def _seen_dispersion(twin) -> np.ndarray:
    """The twin's true dispersion at the BPMs [eta_x; eta_y] (pyAT on its errored lattice), seen through the
    BPM gains and rolls (as in test_dispersion)."""
    ex, ey = twin.dispersion()
    return twin.errors.bpm_linear() @ np.concatenate([ex, ey])


@pytest.mark.parametrize("lat", ["sls2", "nsls2_2014March", "siam_sps"])
def test_default_rf_steps_measure_the_true_dispersion(generated, run_engine, catalog_dir, lat):
    """No df in the profile: measure_dispersion and measure_orm(rf=True) step the RF by dp/p = 3e-4 (siam_sps:
    645 Hz, was 20 Hz = dp/p 9.3e-6 and a vertical dispersion 57 % off; the cavity-less rings lost the beam).
    Measured (seed 1): eta_x 1.0 % (SLS 2.0: its 0.7 mm orbit changes alpha_c), 0.33 %, 0.32 % rms off the truth;
    eta_y 0.25, 0.23, 0.22 mm rms (of 11-14 mm); the ORM's RF column 1.2 %, 0.34 %, 0.31 % off -eta/(f alpha_c)."""
    m = machine_of(generated, lat)
    assert "df" not in m.profile.tool_defaults("dispersion") and "df" not in m.profile.tool_defaults("orbit_response")
    twin = m.twin
    f0 = twin.rf_frequency_setpoint
    cat = ab.open_catalog(catalog_dir=catalog_dir)
    disp = Dispersion.from_run(cat[run_engine(ap.measure_dispersion(m)).plan_result])
    assert twin.rf_frequency_setpoint == f0 and not twin.beam_lost
    df = float(disp.df[-1])
    assert df == pytest.approx(3e-4 * at.get_mcf(m.profile.load_lattice()) * f0, rel=1e-9)
    assert abs(df / (disp.f_rf * disp.alpha_c)) == pytest.approx(3e-4, rel=1e-9)
    truth = _seen_dispersion(twin)
    n = twin.nbpm
    ex_err = np.linalg.norm(disp.eta_x - truth[:n]) / np.linalg.norm(truth[:n])
    ey_err = rms(disp.eta_y - truth[n:])
    assert ex_err < 0.02, (lat, ex_err)
    assert ey_err < 0.5e-3 and ey_err < 0.05 * rms(truth[n:]), (lat, ey_err, rms(truth[n:]))
    cor = [next(f for f in m.profile.families.values() if f.spec.type == "hcor").device_names[0]]
    resp = OrbitResponse.from_run(cat[run_engine(ap.measure_orm(m, correctors=cor, rf=True)).plan_result])
    assert resp.df == pytest.approx(df, rel=1e-9)
    pred = -truth / (disp.f_rf * disp.alpha_c)
    assert np.linalg.norm(resp.rf - pred) / np.linalg.norm(pred) < 0.02
    assert twin.rf_frequency_setpoint == f0


# -------------------------------------------------------------------------------------------------------------
def _truth_orm(twin, names: list[str]) -> np.ndarray:
    """d(BPM readings)/dI [m/A] from pyAT on the twin's errored lattice: finite differences of the closed orbit
    (line: the trajectory of the injected beam), the twin's BPM gains/rolls and corrector calibration errors
    applied."""
    prof = twin.profile
    ring = twin.ring
    bpms = prof.bpm_refpts
    cols = []
    d = 1e-6
    with twin._lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            fam, i = prof.locate(name)
            spec = prof.families[fam].spec
            el = ring[int(prof.families[fam].refpts[i])]
            k = spec.field_parts[1]
            ka = el.KickAngle  # changed in place: the twin writes into this very array
            ka0 = float(ka[k])
            orbits = []
            for s in (+1, -1):
                ka[k] = ka0 + s * d
                if twin.is_ring:
                    _, o = at.find_orbit4(ring, refpts=bpms, dct=twin._dct())
                else:
                    o = at.lattice_pass(ring, twin.beam.injected().reshape(6, 1), refpts=bpms)[:, 0, :, 0].T
                orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
            ka[k] = ka0
            dtheta_di = spec.calibration.linear * (1.0 + twin.errors.corrector_calibration[fam][i])
            cols.append((orbits[0] - orbits[1]) / (2 * d) * dtheta_di)
        twin._engine_gen = -1
    return twin.errors.bpm_linear() @ np.array(cols).T


def _check_orm(generated, run_engine, catalog_dir, lat, correctors):
    m = machine_of(generated, lat)
    uid = run_engine(ap.measure_orm(m, correctors=correctors)).plan_result
    resp = OrbitResponse.from_run(ab.open_catalog(catalog_dir=catalog_dir)[uid])  # read back from the catalogue
    truth = _truth_orm(m.twin, resp.corrector_names)
    seen = np.linalg.norm(truth, axis=0) > 0  # a line's last correctors have no BPM downstream
    assert seen.sum() >= 2
    err = np.linalg.norm(resp.matrix_hw[:, seen] - truth[:, seen]) / np.linalg.norm(truth[:, seen])
    assert err < 0.01, (lat, err)
    assert np.allclose(resp.matrix_hw[:, ~seen], 0.0, atol=1e-3 * np.abs(truth).max())


@pytest.mark.parametrize("lat", ["siam_sps", "als_bts"])
def test_orm_within_one_percent_of_pyat(generated, run_engine, catalog_dir, lat):
    """measure_orm (every corrector of the small machines) against pyAT on the twin's errored lattice."""
    _check_orm(generated, run_engine, catalog_dir, lat, None)


@pytest.mark.xfail(not _names_resolved(), strict=True, reason=NAMES_XFAIL)
@pytest.mark.parametrize("lat", ["sls2", "petra3_p3x_v24", "nsls2_2014March", "als_loco_3sb_disp_nuy9_122bpms"])
def test_orm_of_a_few_correctors_within_one_percent_of_pyat(generated, run_engine, catalog_dir, lat):
    m = machine_of(generated, lat)
    few = [m.profile.families["HCM"].device_names[3], m.profile.families["VCM"].device_names[5]]
    _check_orm(generated, run_engine, catalog_dir, lat, few)


# -------------------------------------------------------------------------------------------------------------
def _line_response(profile) -> OrbitResponse:
    """The design line's trajectory response [m/A] by tracking (the model a line is steered with)."""
    ring = profile.load_lattice()
    bpms = profile.bpm_refpts
    names, planes, cols = [], [], []
    for fam in profile.families_of_type("hcor", "vcor").values():
        k = fam.spec.field_parts[1]
        for i, r in enumerate(fam.refpts.tolist()):
            outs = []
            for s in (1, -1):
                ka = np.zeros(2)
                ka[k] = s * 1e-5
                ring[r].KickAngle = ka
                o = at.lattice_pass(ring, np.zeros((6, 1)), refpts=bpms)[:, 0, :, 0]
                outs.append(np.concatenate([o[0], o[2]]))
            ring[r].KickAngle = np.zeros(2)
            cols.append((outs[0] - outs[1]) / 2e-5)
            names.append(fam.device_names[i])
            planes.append("x" if fam.spec.type == "hcor" else "y")
    phys = np.array(cols).T
    cal = np.array([profile.families[profile.locate(n)[0]].spec.calibration.linear for n in names])
    return OrbitResponse(phys, phys * cal, profile.bpm_names, names, planes, kind="model")


def _uncoupled_orm(profile) -> OrbitResponse:
    """The textbook model ORM (sqrt(beta_i beta_j) cos(|mu_i - mu_j| - pi Q) / (2 sin pi Q), minus the
    fixed-path-length term eta_i eta_j / (alpha_c C)) from one pyAT optics call at the BPMs and correctors. For
    PETRA III, where pyAT's analytic ORM (get_optics at every one of 3625 elements) takes ~10 s here."""
    ring = profile.load_lattice()
    rows = [(n, f, i) for f, fam in profile.families_of_type("hcor", "vcor").items()
            for i, n in enumerate(fam.device_names)]
    crefs = np.array([int(profile.families[f].refpts[i]) for _, f, i in rows], dtype=np.uint32)
    bpms = np.asarray(profile.bpm_refpts, dtype=np.uint32)
    refs = np.unique(np.concatenate([bpms, crefs, [len(ring)]])).astype(np.uint32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ld = at.linopt2(ring, refpts=refs)  # uncoupled optics: 40x faster than get_optics on PETRA III
        alpha_c, circ = float(at.get_mcf(ring)), ring.circumference
    pos = {int(r): k for k, r in enumerate(refs)}
    b, c = [pos[int(r)] for r in bpms], [pos[int(r)] for r in crefs]
    q = ld.mu[pos[len(ring)], :2] / (2 * np.pi)  # the whole tunes: the sign of sin(pi Q) needs the integer part
    nb = len(bpms)
    m = np.zeros((2 * nb, len(rows)))
    planes = []
    for j, (_, f, _) in enumerate(rows):
        p = 0 if profile.families[f].spec.type == "hcor" else 1
        planes.append("xy"[p])
        dmu = np.abs(ld.mu[b, p] - ld.mu[c[j], p])
        col = np.sqrt(ld.beta[b, p] * ld.beta[c[j], p]) * np.cos(dmu - np.pi * q[p]) / (2 * np.sin(np.pi * q[p]))
        if p == 0:
            col = col - ld.dispersion[b, 0] * ld.dispersion[c[j], 0] / (alpha_c * circ)
        m[p * nb:(p + 1) * nb, j] = col
    cal = np.array([profile.families[f].spec.calibration.linear for _, f, _ in rows])
    return OrbitResponse(m, m * cal, profile.bpm_names, [n for n, _, _ in rows], planes, kind="model")


_ORMS: dict[str, OrbitResponse] = {}


def _model(profile, lat: str) -> OrbitResponse:
    """The model response a machine is steered with (one per lattice for the module)."""
    if lat not in _ORMS:
        _ORMS[lat] = (_line_response(profile) if profile.kind == "line" else _uncoupled_orm(profile)
                      if lat == "petra3_p3x_v24" else model_orm(profile, rf=True))
    return _ORMS[lat]


@pytest.mark.parametrize("lat", ALL)
def test_steering_with_the_noise_cut_never_worse_and_reaches_the_floor(generated, lat):
    """The analysis half of correct_orbit on each machine: the default cut (noise, response error, limits), each
    step judged (a worse step is undone; converged only at the floor); the true orbit (line: trajectory) goes
    down >= 10x or to 1.5x the BPM-offset floor. A line steers with its injection trims too, as correct_orbit does
    there: its orbit is the trajectory of the injected beam, whose error (BTS seed 1: x -0.30 mm, px 81 urad, y
    -35 um, py 148 urad, dp/p -1.3e-3) the correctors alone cannot remove at the first BPM, upstream of the first
    vertical corrector (measured: rms of the 12 readings 1.05 mm -> 106 um at that floor, true 1.42 mm -> 208 um
    against 1.5 x 99 um; with the trims 0.15 um and 99 um)."""
    prof = ab.load_profile(generated[lat])
    twin = ab.Twin(prof, seed=1)
    resp = _model(prof, lat)
    line = prof.kind == "line"
    system = CorrectionSystem.build(resp, injection=model_trajectory_response(prof).injection if line else None)
    before, floor = _true_rms(twin), _offset_floor(twin)
    noise = twin.errors.bpm_noise
    where = [prof.locate(n) for n in resp.corrector_names]
    low = np.array([prof.families[f].spec.limits.low for f, _ in where])
    high = np.array([prof.families[f].spec.limits.high for f, _ in where])
    lim = np.array(INJECTION_KNOB_LIMITS)
    verdicts = []
    for _ in range(4):
        x, y = twin.read_bpms()
        dev = np.concatenate([x, y])
        cur = np.array([twin.get_setpoint(f, i) for f, i in where])
        trims = twin.beam.injection_trim.copy()
        cut = noise_sv_cut(system.solver, dev, bpm_noise=noise)
        n, _ = n_sv_within_limits(system, dev, cut.n_sv, cur, low, high, injection=(trims, -lim, lim))
        st = system.solve_step(dev, n_sv=n)
        safe, _ = limit_step(st.dk, cur, low, high)
        for (f, i), v in zip(where, cur + safe):
            twin.set_setpoint(f, v, index=i)
        if line:
            twin.beam.set_injection(np.clip(trims + st.dinj, -lim, lim))
        xa, ya = twin.read_bpms()
        after = np.concatenate([xa, ya])
        v = judge_step(rms(dev), rms(after), correction_floor(system.solver, dev, n, bpm_noise=noise), noise=noise)
        verdicts.append(v)
        if v.undo:
            for (f, i), c in zip(where, cur):
                twin.set_setpoint(f, c, index=i)
            if line:
                twin.beam.set_injection(trims)
        if v.stalled:
            break
    assert not verdicts[0].undo
    assert _true_rms(twin) <= max(before / 10, 1.5 * floor), [v.message for v in verdicts]
    assert _true_rms(twin) < before


@pytest.mark.xfail(not _names_resolved(), strict=True, reason=NAMES_XFAIL)
@pytest.mark.parametrize("lat", ALL)
def test_correct_orbit_plan_reduces_orbit_tenfold_or_to_the_offset_floor(generated, run_engine, lat):
    m = machine_of(generated, lat)
    before, floor = _true_rms(m.twin), _offset_floor(m.twin)
    orm = _model(m.profile, lat) if lat == "petra3_p3x_v24" else "model"  # (a line: its trajectory response)
    run_engine(ap.correct_orbit(m, orm=orm, max_iter=4, figure_dir=False))
    assert _true_rms(m.twin) <= max(before / 10, 1.5 * floor)


def test_a_lines_orbit_is_the_mean_trajectory_of_the_injected_beam(generated):
    """On a line there is no closed orbit: what the BPMs read in orbit mode is the mean trajectory of the beam the
    injector sends (its static injection error and the injection trims; the shot-to-shot jitter averages out), the
    single-shot trajectory without its jitter. Truth: pyAT tracking of the twin's errored line from the injected
    coordinates. Before, the orbit started on the design entrance orbit (BTS seed 1: rms 524 / 665 um against the
    trajectory's 1238 / 689 um), ignored the trims, and read a beam through the line where every shot was lost."""
    prof = ab.load_profile(generated["als_bts"])
    twin = ab.Twin(prof, seed=1)
    beam = twin.beam
    assert np.any(beam.injection_error[:4] != 0) and np.any(beam.jitter[:4] > 0)

    def tracked():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = at.lattice_pass(twin.ring, beam.injected().reshape(6, 1), refpts=prof.bpm_refpts)[:, 0, :, 0]
        twin._engine_gen = -1
        return o[0], o[2]

    for trim, energy in (((0.0, 0.0, 0.0, 0.0), 0.0), ((2e-4, -1e-4, -3e-4, 5e-5), 1e-3)):
        beam.set_injection(trim)  # the orbit follows the trims and the injection energy at once
        beam.set_injection_energy(energy)
        x, y = twin.orbit()
        tx, ty = tracked()
        assert np.max(np.abs(x - tx)) < 1e-9 and np.max(np.abs(y - ty)) < 1e-9, (trim, energy)
        shot = beam.inject(jitter=False)
        assert np.max(np.abs(x - shot.x_true[0])) < 1e-12 and np.max(np.abs(y - shot.y_true[0])) < 1e-12
    beam.set_injection(np.zeros(4))
    beam.set_injection_energy(0.0)
    x, y = twin.orbit()
    # (measured at the generated errors.scale 0.36; 1238 / 689 um at the 1.0 the scale search gave before it
    # started the line from the injected beam and checked every element's aperture)
    assert rms(x) == pytest.approx(1303.0e-6, abs=0.1e-6) and rms(y) == pytest.approx(856.3e-6, abs=0.1e-6)
    shots = [beam.inject() for _ in range(2000)]  # with their jitter (10 um, 10 urad): 35-58 um rms per BPM
    sx = np.array([a.x_true[0] for a in shots])
    sy = np.array([a.y_true[0] for a in shots])
    dev = np.abs(np.concatenate([sx.mean(axis=0) - x, sy.mean(axis=0) - y]))
    sem = np.concatenate([sx.std(axis=0), sy.std(axis=0)]) / np.sqrt(len(shots))
    assert np.all(dev < 4 * sem) and np.max(dev) < 5e-6, (dev, sem)
    # the readings: the same BPM errors on both; no shot noise in orbit mode
    twin.noise_on = False
    assert np.allclose(np.concatenate(twin.read_bpms()), np.concatenate([beam.inject().x[0], beam.inject().y[0]]),
                       rtol=0, atol=1e-12)
    # a seed whose shots are lost in the line: no beam in orbit mode either, lost where a shot is (seed 3 at the
    # whole alignment table)
    lost = ab.Twin(prof, seed=3, error_scale=1.0)
    shot = lost.beam.inject(jitter=False)
    assert shot.lost and lost.beam_lost and f"element {shot.lost_element} " in lost.loss_reason


def test_a_lines_profile_checks_start_from_the_injected_beam_and_every_element(generated):
    """profile new and profile check judge a line as the twin's orbit mode sees it: the seed's injection error added
    to the design entrance, the aperture checked at every element (not only at the BPMs). Before, the BTS profile
    claimed seeds 1-3 keep a trajectory up to 2x the errors (errors.scale 1) while seed 3 was lost at 1x in both
    modes (at element 101, y 5.15 mm with a 5 mm aperture). Now the scale search finds seed 3's limit (0.715) and
    writes 0.36; at it the twin of every seed 1-10 has its beam, and the check agrees with the twin seed by seed."""
    from acc_bluesky.twin.errors import check_closed_orbit

    prof = ab.load_profile(generated["als_bts"])
    assert prof.spec.errors.scale == pytest.approx(0.36)
    for seed in range(1, 11):
        for scale in (None, 1.0):
            twin = ab.Twin(prof, seed=seed, error_scale=scale)
            check = check_closed_orbit(prof, seed, scale)
            assert check.found == (not twin.beam_lost), (seed, scale, check.reason, twin.loss_reason)
            if scale is None:
                assert check.found, (seed, check.reason)
                x, y = twin.orbit()
                assert np.allclose(check.x, x, rtol=0, atol=1e-12) and np.allclose(check.y, y, rtol=0, atol=1e-12)
    assert not check_closed_orbit(prof, 3, 1.0).found


def test_the_scale_search_alignment_is_pyats_own_on_strong_bends(generated):
    """The scale search rescales the alignment in place (fast) and, where a bend makes its simple form differ from
    pyAT's transform_elem by more than _Alignment.TOL, writes pyAT's own matrices: at any scale every element's
    T1, T2, R1, R2 are within TOL of apply_alignment of the scaled errors (exactly pyAT's on BTS's 20-degree
    dipoles, 45 um / 45 urad off before)."""
    from acc_bluesky.twin import errors as E

    for lat in ("als_bts", "als_loco_3sb_disp_nuy9_122bpms"):
        prof = ab.load_profile(generated[lat])
        unit = E.ErrorModel.generate(prof, 3, scale=1.0)
        ring = prof.load_lattice()
        tilts = {i: t for i, e in enumerate(ring) if (t := E.design_roll(e))}
        align = E._Alignment(ring, unit, tilts)
        assert align.exact
        for s in (0.3, 1.0, 1.7):
            align.scale(s)
            ref = prof.load_lattice()
            E.apply_alignment(ref, E.ErrorModel(dx={k: s * v for k, v in unit.dx.items()},
                                                dy={k: s * v for k, v in unit.dy.items()},
                                                roll={k: s * v for k, v in unit.roll.items()}))
            worst = max(float(np.max(np.abs(np.asarray(getattr(a, k, np.eye(6) if k[0] == "R" else np.zeros(6)))
                                            - np.asarray(getattr(b, k, np.eye(6) if k[0] == "R" else np.zeros(6))))))
                        for a, b in zip(ring, ref) for k in ("T1", "T2", "R1", "R2"))
            assert worst <= E._Alignment.TOL, (lat, s, worst)
            where = {id(e): i for i, e in enumerate(ring)}
            for e, *_ in align.exact:  # pyAT's own, bit for bit
                r = ref[where[id(e)]]
                assert all(np.array_equal(getattr(e, k), getattr(r, k)) for k in ("T1", "T2", "R1", "R2")), lat


def test_a_lines_model_response_is_its_tracked_trajectory_response(generated):
    """model_orm of a transfer line (what correct_orbit(orm="model") and orbit_bump use there): pyAT's analytical
    trajectory response from the entrance optics, equal to finite differences of tracking through the design line
    within 1e-6 relative; zero upstream of each corrector; no RF column."""
    prof = ab.load_profile(generated["als_bts"])
    model = model_orm(prof, rf=True)
    tracked = _line_response(prof)
    col = {c: j for j, c in enumerate(tracked.corrector_names)}
    t = tracked.matrix_hw[:, [col[c] for c in model.corrector_names]]
    assert model.rf is None and model.matrix_hw.shape == t.shape
    assert np.linalg.norm(model.matrix_hw - t) <= 1e-6 * np.linalg.norm(t)
    s_bpm = prof.s_positions(prof.bpm_refpts)
    for j, c in enumerate(model.corrector_names):
        upstream = np.tile(s_bpm < prof.s_positions([int(model.corrector_refpts[j])])[0], 2)
        assert np.all(model.matrix_hw[upstream, j] == 0.0), c


def test_an_orbit_bump_on_a_line_closes_downstream(generated, run_engine, catalog_dir):
    """A 1 mm horizontal bump at a BPM of the line, on the model response (no RF: a line's path is not closed):
    the twin's true trajectory changes by the requested amount as the BPM reads it (its gain error aside: 2 %
    rms) and returns to within 2 um downstream of the bump."""
    m = machine_of(generated, "als_bts")
    m.twin.reset()
    x0, y0 = m.twin.orbit()
    b = 1  # (BPMs downstream of its last corrector: the line has 6)
    uid = run_engine(ap.orbit_bump(m, m.bpm.names[b], 1e-3, plane="x", figure_dir=False)).plan_result
    x1, y1 = m.twin.orbit()
    start = ab.open_catalog(catalog_dir=catalog_dir)[uid].metadata["start"]
    assert start["bump_rf"] is False
    d = x1 - x0
    assert abs(d[b] - 1e-3) < 0.06e-3, d[b]
    cors = [m.device(c) for c in start["bump_correctors"] if m.device(c).plane == "x"]
    after = m.bpm.s > max(c.s for c in cors)
    assert after.any() and np.all(np.abs(d[after]) < 2e-6), d[after]
    m.twin.reset()


# -------------------------------------------------------------------------------------------------------------
def _pair(profile, ftype: str) -> list[str]:
    """The two families of a type with the best-conditioned linear response, estimated from the design optics
    (tune: sum of L (beta_x, -beta_y); chromaticity: sum of L eta_x (beta_x, -beta_y)): the plan then computes the
    model response of these two only."""
    ring = profile.load_lattice()
    fams = profile.families_of_type(ftype)
    refs = np.unique(np.concatenate([f.refpts for f in fams.values()]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, ld = at.linopt2(ring, refpts=refs)
    where = {int(r): k for k, r in enumerate(refs)}
    cols = {}
    for n, f in fams.items():
        k = np.array([where[int(r)] for r in f.refpts])
        w = np.array([ring[int(r)].Length or 1.0 for r in f.refpts])
        if ftype == "sextupole":
            w = w * ld.dispersion[k, 0]
        cols[n] = np.array([np.sum(w * ld.beta[k, 0]), -np.sum(w * ld.beta[k, 1])])
    names = list(cols)
    best = max(((a, b) for i, a in enumerate(names) for b in names[i + 1:]),
               key=lambda ab: abs(np.linalg.det(np.column_stack([cols[ab[0]], cols[ab[1]]]))))
    return list(best)


def _tune_target(q0: np.ndarray, step: float = 0.01) -> np.ndarray:
    """``q0`` moved by ``step`` in each plane, the sign chosen to stay farthest from resonances of order <= 3."""
    def gap(q):
        return min(abs(a * q[0] + b * q[1] - round(a * q[0] + b * q[1])) for a in range(-3, 4) for b in range(-3, 4)
                   if 0 < abs(a) + abs(b) <= 3)

    cands = [(q0 + np.array([sx, sy]) * step) % 1.0 for sx in (1, -1) for sy in (1, -1)]
    return max(cands, key=gap)


@pytest.mark.parametrize("lat", RINGS)
def test_tunes_to_a_target_001_away(generated, run_engine, lat):
    m = machine_of(generated, lat)
    q0 = m.twin.tunes()
    target = _tune_target(q0)
    run_engine(ap.correct_tune(m, target=tuple(target), families=_pair(m.profile, "quadrupole"), response="model",
                               figure_dir=False))
    assert np.max(np.abs(m.twin.tunes() - target)) < 1e-3


@pytest.mark.parametrize("lat", RINGS)
def test_chromaticity_to_a_target_1_away(generated, run_engine, lat):
    m = machine_of(generated, lat)
    xi0 = m.twin.chromaticity()
    target = xi0 + 1.0
    run_engine(ap.correct_chromaticity(m, target=tuple(target), families=_pair(m.profile, "sextupole"),
                                       response="model", steps=3, order=1, max_iter=2, figure_dir=False))
    assert np.max(np.abs(m.twin.chromaticity() - target)) < 0.2


def test_petra_skew_quadrupoles_are_rolled_normal_ones_and_their_errors_add_to_the_roll(generated):
    """PETRA III's 16 ``qs`` magnets are normal quadrupoles rolled by -45 degrees in the file: design tilts, not
    errors (the generator sizes the alignment errors as for any ring), driven through their own gradient
    (PolynomB[1], a skew gradient in the lab frame), and a roll error adds to the tilt instead of replacing it."""
    import math

    from acc_bluesky.profile.loader import design_tilt_angle

    prof = ab.load_profile(generated["petra3_p3x_v24"])
    fam = prof.families["qs"]
    assert (fam.spec.type, fam.spec.field, len(fam)) == ("skew", "PolynomB[1]", 16)
    assert not any("already shifts or rolls" in n for n in prof.spec.generated.notes)
    twin = ab.Twin(prof, seed=1, error_scale=0.3)
    design = prof.load_lattice()
    for r in fam.refpts.tolist():
        tilt = design_tilt_angle(design[r].R1)
        assert tilt == pytest.approx(-math.pi / 4, abs=1e-12)
        e = twin.ring[r]
        got = math.atan2(e.R1[0, 2], e.R1[0, 0])
        assert got == pytest.approx(tilt + twin.errors.roll.get(r, 0.0), abs=1e-12)
        assert twin.errors.roll.get(r, 0.0) != 0.0
    # the family couples the planes: x-y block of the one-turn map from 2e-9 to > 1 for a 20 A step; a normal
    # quadrupole family's step of the same size leaves it at zero
    ideal = ab.Twin(prof, seed=1, error_scale=0)

    def coupling(t):
        m44, _ = at.find_m44(t.ring)
        return float(np.linalg.norm(m44[0:2, 2:4]))

    assert coupling(ideal) < 1e-6
    ideal.set_setpoint("qs", ideal.get_setpoint("qs") + 20.0)
    assert coupling(ideal) > 1.0


@pytest.mark.parametrize("lat", ALL)
def test_monitor_bpms_measures_the_injected_bpm_noise(generated, lat, run_engine):
    """monbpm on every lattice: the noise floor is the twin's BPM noise and no BPM is flagged. Within 5 % in the rings
    (a median over 24 to 252 BPMs of 60 readings each, 9 % per BPM), 25 % on the 6 BPMs of the BTS line."""
    from acc_bluesky.analysis import BpmStatistics
    from acc_bluesky.data import read_stream

    m = machine_of(generated, lat)
    noise = m.twin.errors.bpm_noise
    uid = run_engine(ap.monitor_bpms(m, n_readings=60, figure_dir=False))
    st = BpmStatistics.from_run(run_engine.catalog[uid])
    assert len(read_stream(run_engine.catalog[uid])["time"]) == 60 and st.n_readings == 60
    np.testing.assert_allclose(st.noise, [noise, noise], rtol=0.05 if lat in RINGS else 0.25)
    assert st.suspect == [], st.summary()


def test_petra_seed_without_closed_orbit_does_not_zero_the_alignment_errors(generated):
    """PETRA III's seed 3 has no closed orbit with its field errors alone (13.7 mm beyond the aperture): the
    error search leaves it out (seeds 1-2 size the scale, 0.5 x the smaller limit) and says so, instead of giving
    every twin of the profile no alignment errors; seed 1, connect's default, has its closed orbit at that scale."""
    from acc_bluesky.twin.errors import check_closed_orbit

    prof = ab.load_profile(generated["petra3_p3x_v24"])
    note = prof.spec.generated.errors
    assert prof.spec.errors.scale > 0.1, note
    assert "seed(s) 3 have no closed orbit with their field errors alone" in note
    assert "every other seed of 1-3 (1, 2)" in note
    field_only = check_closed_orbit(prof, 3, 0.0)
    assert not field_only.found and "beyond the aperture" in field_only.reason
    assert check_closed_orbit(prof, 1, prof.spec.errors.scale).found
    twin = ab.Twin(prof, seed=1)
    assert not twin.beam_lost and twin.errors.scale == prof.spec.errors.scale and any(twin.errors.dx.values())


def test_design_tilt_angle():
    import math

    from acc_bluesky.profile.loader import design_tilt_angle, rotated_skew

    def rot(theta):
        c, s = math.cos(theta), math.sin(theta)
        r = np.eye(6)
        r[0, 0] = r[1, 1] = r[2, 2] = r[3, 3] = c
        r[0, 2] = r[1, 3] = s
        r[2, 0] = r[3, 1] = -s
        return r

    assert design_tilt_angle(rot(math.pi / 4)) == pytest.approx(math.pi / 4)
    assert design_tilt_angle(rot(-math.pi / 2)) == pytest.approx(-math.pi / 2)
    assert design_tilt_angle(rot(1e-3)) is None  # a roll error
    shear = rot(math.pi / 4)
    shear[0, 1] = 0.1
    assert design_tilt_angle(shear) is None and design_tilt_angle(np.eye(4)) is None and design_tilt_angle(None) is None
    quad = at.Quadrupole("q", 0.3, 0.0)
    quad.R1, quad.R2 = rot(math.pi / 4), rot(-math.pi / 4)
    assert rotated_skew(quad)
    quad.R1 = rot(math.pi / 2)
    assert not rotated_skew(quad)


# -------------------------------------------------------------------------------------------------------------
def test_sls2_bba_pairs_no_trim_quadrupole_and_finds_the_true_offsets(generated, run_engine):
    """SLS 2.0 has 528 trim quadrupoles (``MQCO``) of zero or near-zero design gradient next to its BPMs: BBA's
    relative step does not move them (it did pair 96 of 134 BPMs with them, offsets 100 um rms from the truth,
    worse than the 50 um offsets). Every pair now has a quadrupole whose 5 % step shifts a tune by >= 1e-3; a BPM
    with only trim quadrupoles near it is skipped naming the trim quadrupole; a trim quadrupole given by hand is
    refused with the reason; quadcenter at two BPMs that had one (ARS06/ARS08_DBPM_5530) finds the twin's true
    offset within 2.5 um (measured 0.8-1.7 um)."""
    from acc_bluesky.analysis.bba import _step_tune_shift, bba_model, bba_pairs, true_offset
    from acc_bluesky.plan_stubs.tool import remembered

    prof = ab.load_profile(generated["sls2"])
    model = bba_model(prof)
    pairs, skipped = bba_pairs(prof, planes=("x",), choose_corrector=False)
    assert len(pairs) >= 70 and all(_step_tune_shift(model, p.quad_index, 0.05) >= 1e-3 for p in pairs)
    assert not any("MQCO" in p.quad for p in pairs)
    trim = [s for s in skipped if "MQCO" in s[2]]
    assert trim and "design gradient" in trim[0][2]
    _, refused = bba_pairs(prof, bpms=["ARS01_DBPM_1900"], quads=["ARS01_MQCO_1950_1"], choose_corrector=False)
    assert refused and "no design gradient" in refused[0][2]
    m = machine_of(generated, "sls2")
    if _true_rms(m.twin) > 150e-6:  # BBA measures on the operating orbit (docs/tools/bba.md)
        run_engine(ap.correct_orbit(m, orm="model", max_iter=4, figure_dir=False))
    bpms = ["ARS06_DBPM_5530", "ARS08_DBPM_5530"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uid = run_engine(ap.measure_bba(m, bpms=bpms, figure_dir=False)).plan_result
    res = remembered(uid)[1]
    assert list(res.bpm_names) == bpms
    for p, plane in enumerate("xy"):
        quads = [q[p] for q in res.quad_names]
        assert all(q.startswith("ARS") and "MQUA" in q for q in quads)
        truth = true_offset(m.twin, bpms, quads, [plane] * len(bpms))
        assert np.all(np.abs(res.offset[:, p] - truth) < 2.5e-6), (plane, res.offset[:, p], truth)


def test_sls2_weak_trim_quadrupoles_get_the_trims_range(generated):
    """SLS 2.0's trim quadrupoles (kind MQCO) run at 0 (448) or 0.002-0.27 m^-2 (80, ten families): the generator
    gave the weak ones limits of 1.5x their own design (MQCO_7: +-0.0034 m^-2) beside +-1 m^-2 for the zero ones,
    and correct_optics after a default LOCO (18.4 / 8.8 % beta-beat) was refused (MQCO_2 163 A outside +-160 A;
    MQCO_7 100x its limit). Every MQCO family now has the trims' +-1 m^-2 (0.01 m^-2/A, +-100 A), and the main
    quadrupoles keep 1.5x their design (MQUA: 0.09 m^-2/A)."""
    prof = ab.load_profile(generated["sls2"])
    trims = [f for f in prof.families if f == "MQCO" or f.startswith("MQCO_")]
    assert len(trims) == 11
    for f in trims:
        spec = prof.families[f].spec
        k_max = spec.calibration.linear * spec.limits.high
        assert k_max == pytest.approx(1.0), f
    mqua = prof.families["MQUA"].spec
    assert mqua.calibration.linear == 0.09 and mqua.limits.high == 160.0
