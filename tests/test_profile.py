"""Profiles: loading, validation messages, calibrations, selections."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from acc_bluesky.profile import Calibration, LimitError, Limits, ProfileError, load_profile


def test_ebs_profile_families(ebs):
    assert ebs.name == "ebs"
    assert len(ebs.bpm_refpts) == 224
    assert len(ebs.families["HST"]) == 224 and len(ebs.families["VST"]) == 224
    assert ebs.families["HST"].spec.field == "KickAngle[0]"
    assert {n for n, f in ebs.families.items() if f.spec.type == "quadrupole"} == {
        "QF2", "QD3", "QD4", "QF5", "QD6", "QF7"}
    assert sum(len(f) for f in ebs.families_of_type("quadrupole").values()) == 256
    assert sum(len(f) for f in ebs.families_of_type("sextupole").values()) == 224
    assert len(ebs.sha256) == 64 and len(ebs.lattice_sha256) == 64
    assert ebs.lattice_path.name == "esrf.m"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ProfileError, match="known profiles: .*ebs"):
        load_profile("no-such-machine")


def _write(tmp_path, body: str):
    p = tmp_path / "bad" / "profile.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(body))
    return p


GOOD = """
facility: X
accelerator: Y
energy: 6.0e9
lattice: {package: machine_data, file: esrf.m}
families:
  Q: {type: quadrupole, select: {name: QF2}, field: "PolynomB[1]", calibration: {linear: 0.01}, limits: [-100, 100]}
"""


def test_minimal_profile_loads(tmp_path):
    p = load_profile(_write(tmp_path, GOOD))
    assert len(p.families["Q"]) == 32


@pytest.mark.parametrize(
    ("replace", "expect"),
    [
        (("energy: 6.0e9", "energy: -1"), r"key 'energy': .*greater than 0"),
        (("type: quadrupole", "type: quadrupol"), r"key 'families.Q.type'"),
        (('field: "PolynomB[1]"', 'field: "Polynom B"'), r"key 'families.Q.field'.*'K', 'H'"),
        (("limits: [-100, 100]", "limits: [100, -100]"), r"families.Q.limits.*low < high"),
        (("calibration: {linear: 0.01}", "calibration: {linear: 0.01, poly: [0, 1]}"), r"exactly one of"),
        (("select: {name: QF2}", "select: {name: 'QF2['}"), r"not a valid regular expression"),
        (("facility: X\n", ""), r"key 'facility': Field required"),
        (("limits: [-100, 100]}", "limits: [-100, 100], pv: {readbakc: 'X'}}"),
         r"families.Q.pv.readbakc.*'setpoint', 'readback', 'setpoints' or 'readbacks'"),
    ],
)
def test_profile_errors_name_file_key_and_expectation(tmp_path, replace, expect):
    path = _write(tmp_path, GOOD.replace(*replace))
    with pytest.raises(ProfileError, match=expect) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_selection_matching_nothing_is_explained(tmp_path):
    path = _write(tmp_path, GOOD.replace("select: {name: QF2}", "select: {name: QZZ}"))
    with pytest.raises(ProfileError, match=r"families.Q.select.*selects no element.*classes present"):
        load_profile(path).families  # noqa: B018


def test_bad_device_status(tmp_path):
    body = GOOD.replace("limits: [-100, 100]}", "limits: [-100, 100], status: {bad: [40]}}")
    with pytest.raises(ProfileError, match=r"status.bad.*out of range"):
        load_profile(_write(tmp_path, body)).families  # noqa: B018
    body = GOOD.replace("limits: [-100, 100]}", "limits: [-100, 100], status: {bad: ['Q_003', 5]}}")
    fam = load_profile(_write(tmp_path, body)).families["Q"]
    assert fam.bad == {2, 5} and fam.good.sum() == 30


@pytest.mark.parametrize(
    "cal",
    [
        Calibration(linear=5e-5),
        Calibration(poly=[0.001, 0.02, 1e-5]),
        Calibration(table={"hw": [0, 50, 100, 150], "physics": [0.0, 1.0, 1.9, 2.6]}),
    ],
)
def test_calibration_round_trip(cal):
    hw = np.linspace(-20, 140, 33)
    for energy in (6.0e9, 5.5e9):
        phys = cal.hw2physics(hw, energy, 6.0e9)
        assert np.allclose(cal.physics2hw(phys, energy, 6.0e9), hw, rtol=0, atol=1e-9)


def test_calibration_scales_with_energy():
    cal = Calibration(linear=0.01)
    assert cal.hw2physics(100.0, 3.0e9, 6.0e9) == pytest.approx(2.0)  # lower energy, stronger focusing
    assert cal.hw2physics(100.0, 6.0e9, 6.0e9) == pytest.approx(1.0)


def test_limits_refuse_and_name_device():
    lim = Limits(low=-8, high=8)
    lim.check("HST_001", 7.9, "A")
    with pytest.raises(LimitError, match=r"HST_001: setpoint 9 A is outside the limits \[-8, 8\] A"):
        lim.check("HST_001", 9.0, "A")
    with pytest.raises(LimitError, match="not a finite number"):
        lim.check("HST_001", float("nan"), "A")
