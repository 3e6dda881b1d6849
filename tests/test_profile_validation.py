"""Profile validation at load (issue 13, item 1): one test per bad input, each asserting its message.

Every message names the file, the key, the value and what is expected; nothing is loaded half-way.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest

from acc_bluesky.cli import main
from acc_bluesky.profile import ProfileError, load_profile
from acc_bluesky.profile.loader import ProfileWarning

GOOD = """
facility: X
accelerator: Y
energy: 6.0e9
lattice: {package: machine_data, file: hmba.mat}
families:
  HC: {type: hcor, select: {class: Sextupole}, field: "KickAngle[0]", calibration: {linear: 1.0e-5}, limits: [-40, 40]}
  VC: {type: vcor, select: {class: Sextupole}, field: "KickAngle[1]", calibration: {linear: 1.0e-5}, limits: [-40, 40]}
  QF: {type: quadrupole, select: {name: "QF.*"}, field: "PolynomB[1]", calibration: {linear: 0.01}, limits: [-500, 500]}
rf: {frequency_limits: [3.5e+8, 3.6e+8]}
"""


def _write(tmp_path, body: str):
    p = tmp_path / "bad" / "profile.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(body))
    return p


def _refused(tmp_path, old: str, new: str, match: str, key: str):
    """Load GOOD with ``old`` replaced by ``new``: refused, the message names the file and ``key``."""
    body = GOOD.replace(old, new) if old else GOOD + new
    assert body != GOOD
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError, match=match) as info:
        load_profile(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg, msg
    return msg


def test_good_profile_loads(tmp_path):
    p = load_profile(_write(tmp_path, GOOD))
    assert len(p.families["QF"]) == 10 and p.warnings == []
    assert p.families["QF"].device_names[:2] == ["QF_001", "QF_002"]


# -- limits ----------------------------------------------------------------------------------------------
def test_nan_limit_refused(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]", "limits: [.nan, 500]", r"limits.low must be a finite number, got nan",
             "families.QF.limits")


def test_infinite_limit_refused(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]", "limits: [-400, .inf]", r"limits.high must be a finite number, got inf"
             r".*omit the limit", "families.QF.limits")


def test_equal_limits_refused(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]", "limits: [5, 5]", r"low < high, got \[5.0, 5.0\]", "families.QF.limits")


def test_rf_nan_limit_refused(tmp_path):
    _refused(tmp_path, "rf: {frequency_limits: [3.5e+8, 3.6e+8]}", "rf: {frequency_limits: [.nan, 3.6e+8]}",
             r"finite number, got nan", "rf.frequency_limits")


def test_non_numeric_limit_refused(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]", "limits: [-400, lots]", r"limits.high must be a number in hardware "
             r"units, got 'lots'", "families.QF.limits")


def test_energy_nan_refused(tmp_path):
    _refused(tmp_path, "energy: 6.0e9", "energy: .nan", r"finite number", "energy")


# -- PV templates ----------------------------------------------------------------------------------------
def test_unknown_placeholder_refused(tmp_path):
    msg = _refused(tmp_path, "", "controls: {magnet_setpoint: '{prefix}{fam}:{index:03d}:I-SP'}\n",
                   r"unknown placeholder\(s\) \{fam\}", "controls")
    assert "{device}" in msg  # what is known


def test_unbalanced_brace_refused(tmp_path):
    _refused(tmp_path, "", "controls: {magnet_setpoint: '{prefix}{device:I-SP'}\n", r"is malformed.*every '\{' needs",
             "controls")


def test_template_without_a_per_device_placeholder_refused(tmp_path):
    _refused(tmp_path, "", "controls: {magnet_setpoint: '{prefix}{family}:I-SP'}\n",
             r"names every device alike: add \{device\}", "controls")


def test_bad_format_spec_refused(tmp_path):
    _refused(tmp_path, "", "controls: {bpm_x: '{prefix}BPM{device:03d}:X'}\n", r"cannot be formatted", "controls")


def test_equal_x_and_y_templates_refused(tmp_path):
    _refused(tmp_path, "", "controls: {bpm_x: '{prefix}{device}:POS', bpm_y: '{prefix}{device}:POS'}\n",
             r"bpm_x and controls.bpm_y are the same template", "controls")


def test_family_pv_override_checked(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]}", "limits: [-500, 500], pv: {setpoints: '{prefix}{device}:SP'}}",
             r"pv.setpoints template .*unknown placeholder\(s\) \{device\}", "families.QF.pv")


def test_pvs_must_be_distinct(tmp_path):
    """Both corrector families sit on the same sextupoles: '{element}' gives them the same PVs."""
    msg = _refused(tmp_path, "", "controls: {magnet_setpoint: '{prefix}{element}:I-SP'}\n",
                   r"PV 'SIM:SD1A:I-SP' is also the PV of", "controls.magnet_setpoint")
    assert "every device needs its own PV" in msg


# -- tool defaults ---------------------------------------------------------------------------------------
def test_tool_delta_must_be_a_number(tmp_path):
    _refused(tmp_path, "", "tools: {orbit_response: {delta: big}}\n", r"valid number.*got 'big'",
             "tools.orbit_response.delta")


def test_tool_count_must_be_an_integer(tmp_path):
    _refused(tmp_path, "", "tools: {chromaticity: {steps: 2.7}}\n", r"valid integer.*got 2.7",
             "tools.chromaticity.steps")


def test_tool_value_in_range(tmp_path):
    _refused(tmp_path, "", "tools: {orbit_correction: {rcond: 2}}\n", r"less than 1", "tools.orbit_correction.rcond")


def test_tool_defaults_are_mappings(tmp_path):
    _refused(tmp_path, "", "tools: {my_tool: 3}\n", r"tools.my_tool must be a mapping", "tools")


def test_known_and_unknown_tool_keys_pass_typed(tmp_path):
    p = load_profile(_write(tmp_path, GOOD + "tools: {orbit_response: {delta: 0.5, future_key: x}, mine: {a: 1}}\n"))
    assert p.tool_defaults("orbit_response") == {"delta": 0.5, "future_key": "x"}
    assert p.tool_defaults("mine") == {"a": 1} and p.tool_defaults("dispersion") == {}


# -- fields against the element class --------------------------------------------------------------------
def test_field_with_no_effect_on_a_quadrupole_family(tmp_path):
    _refused(tmp_path, 'field: "PolynomB[1]"', 'field: "PolynomB[7]"',
             r"'PolynomB\[7\]' has no effect as the field of a quadrupole family 'QF' \(a quadrupole family drives "
             r"PolynomB\[1\] \(or K\)\)", "families.QF.field")


def test_corrector_plane_field(tmp_path):
    _refused(tmp_path, 'VC: {type: vcor, select: {class: Sextupole}, field: "KickAngle[1]"',
             'VC: {type: vcor, select: {class: Sextupole}, field: "KickAngle[0]"',
             r"no effect as the field of a vcor family 'VC' \(a vcor family drives KickAngle\[1\]",
             "families.VC.field")


def test_field_on_an_element_that_ignores_it(tmp_path):
    body = GOOD.replace("rf:", "  MON: {type: magnet, select: {class: Monitor}, field: \"PolynomB[1]\"}\nrf:")
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError, match=r"'PolynomB\[1\]' has no effect on Monitor element 'BPM_01' \(PassMethod "
                                           r"IdentityPass\) of family 'MON'") as info:
        load_profile(path)
    assert str(path) in str(info.value) and "families.MON.field" in str(info.value)


def test_field_beyond_max_order_warns(tmp_path):
    body = GOOD.replace("rf:", "  Q7: {type: magnet, select: {name: \"QD.*\"}, field: \"PolynomB[7]\"}\nrf:")
    with pytest.warns(ProfileWarning, match=r"families.Q7.field.*'PolynomB\[7\]' is above the MaxOrder \(1\) of "
                                            r"Quadrupole 'QD2A' in family 'Q7'"):
        p = load_profile(_write(tmp_path, body))
    assert len(p.warnings) == 1


# -- device names ----------------------------------------------------------------------------------------
def test_device_names_unique_across_the_machine(tmp_path):
    body = GOOD.replace('limits: [-40, 40]}', 'limits: [-40, 40], device_names: "{element}"}')
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError, match=r"device names must be unique across the machine; 6 repeat\(s\): "
                                           r"'SD1A' in families.HC, families.VC") as info:
        load_profile(path)
    assert str(path) in str(info.value) and "families.HC.device_names" in str(info.value)


def test_device_names_template_placeholders(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]}", 'limits: [-500, 500], device_names: "{fam}_{n}"}',
             r"unknown placeholder\(s\) \{fam\}", "families.QF.device_names")


def test_device_names_template_needs_a_number_or_the_element(tmp_path):
    _refused(tmp_path, "limits: [-500, 500]}", 'limits: [-500, 500], device_names: "{family}"}',
             r"gives every device the same name", "families.QF.device_names")


def test_status_bad_takes_the_device_names(tmp_path):
    p = load_profile(_write(tmp_path, GOOD.replace("limits: [-500, 500]}", "limits: [-500, 500], "
                                                   "status: {bad: [QF_003, 0]}}")))
    assert p.families["QF"].bad == {0, 2}
    msg = _refused(tmp_path, "limits: [-500, 500]}", "limits: [-500, 500], status: {bad: ['QF:003']}}",
                   r"unknown device 'QF:003'; device names look like 'QF_001' \.\.\. 'QF_010'",
                   "families.QF.status.bad")
    assert "0-based index" in msg


def test_device_names_from_the_lattice_and_pv_placeholders(tmp_path):
    from acc_bluesky.devices.backends.epics import pv_names

    body = GOOD.replace('limits: [-500, 500]}', 'limits: [-500, 500], device_names: "{element}"}') + (
        "bpm: {select: {class: Monitor}, device_names: '{element}'}\n"
        "controls: {prefix: 'T:', magnet_readback: '{prefix}{family}:{index:02d}:{element}:RB'}\n")
    p = load_profile(_write(tmp_path, body))
    assert p.families["QF"].device_names[0] == "QF1A" and p.bpm_names[0] == "BPM_01"
    assert p.locate("QF1A") == ("QF", 0) and p.locate("BPM_02") == ("BPM", 1)
    pvs = pv_names(p)
    assert pvs["QF:001:setpoint"] == "T:QF1A:I-SP"
    assert pvs["QF:001:readback"] == "T:QF:01:QF1A:RB"
    assert pvs["BPM:001:x"] == "T:BPM_01:X" and pvs["HC:002:setpoint"] == "T:HC_002:I-SP"


# -- lines, the lattice ----------------------------------------------------------------------------------
def test_twiss_in_keys_and_values(tmp_path):
    _refused(tmp_path, "", "twiss_in: {beta: [10, 10], alfa: [0, 0]}\n", r"unknown key 'alfa'", "twiss_in")
    _refused(tmp_path, "", "twiss_in: {beta: [10, -1], alpha: [0, 0]}\n", r"beta functions must be > 0", "twiss_in")


def test_unknown_lattice_option(tmp_path):
    _refused(tmp_path, "lattice: {package: machine_data, file: hmba.mat}",
             "lattice: {package: machine_data, file: hmba.mat, options: {strictly: false}}",
             r"Extra inputs are not permitted", "lattice.options.strictly")


def test_profile_check_exits_nonzero_naming_file_and_key(tmp_path, capsys):
    path = _write(tmp_path, GOOD.replace("limits: [-500, 500]", "limits: [.nan, 500]"))
    assert main(["profile", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "families.QF.limits" in err and "finite" in err


def test_profile_check_exits_nonzero_when_a_plane_has_no_corrector(tmp_path, capsys):
    body = GOOD.replace('  VC: {type: vcor, select: {class: Sextupole}, field: "KickAngle[1]", calibration: '
                        '{linear: 1.0e-5}, limits: [-40, 40]}\n', "")
    path = _write(tmp_path, body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["profile", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE" in out and "no vertical corrector" in out and "type vcor" in out


def test_design_setpoints_outside_the_limits_warn_at_load_and_fail_the_check(tmp_path, capsys):
    """hmba.mat's QF magnets reach k = 4.5 m^-2: 446 A at 0.01 m^-2/A, past limits of +-150 A. The tools would refuse
    every move of those magnets; the loader warns with the family, the worst device and its value, and
    ``profile check`` exits non-zero."""
    path = _write(tmp_path, GOOD.replace("limits: [-500, 500]}", "limits: [-150, 150]}"))
    with pytest.warns(ProfileWarning) as seen:
        p = load_profile(path)
    (msg,) = [str(w.message) for w in seen]
    design = p.design_hw("QF")
    worst = int(abs(design).argmax())
    assert abs(design[worst]) > 150 and f"up to {design[worst]:.4g} A at {p.families['QF'].names[worst]}" in msg
    n_out = int((abs(design) > 150).sum())
    assert str(path) in msg and "families.QF.limits" in msg and f"{n_out} of 10 design setpoints" in msg
    assert p.warnings == [msg]
    assert main(["profile", "check", str(path)]) == 1
    out = capsys.readouterr().out
    usable = out.split("NOT USABLE")
    assert len(usable) == 2 and "families.QF.limits" in usable[1] and "families.QF.limits" not in usable[0]


def test_design_hw_is_where_the_twin_starts(tmp_path):
    from acc_bluesky.twin import Twin

    p = load_profile(_write(tmp_path, GOOD))
    t = Twin(p, seed=1)
    for fam in ("QF", "HC", "VC"):
        assert (t.get_setpoint(fam) == p.design_hw(fam)).all()


# -- RF of a ring without a cavity -------------------------------------------------------------------------
def _cavityless(tmp_path, rf: str):
    """GOOD on the same HMBA cell with its cavity removed (a JSON lattice), ``rf`` as the profile's rf line."""
    import at

    ring = load_profile(_write(tmp_path, GOOD)).load_lattice()
    bare = at.Lattice([e for e in ring if not isinstance(e, at.RFCavity)], energy=ring.energy,
                      periodicity=ring.periodicity, name="hmba_bare")
    lat = tmp_path / "bad" / "bare.json"
    bare.save(str(lat))
    body = GOOD.replace("lattice: {package: machine_data, file: hmba.mat}", "lattice: {path: bare.json}")
    return _write(tmp_path, body.replace("rf: {frequency_limits: [3.5e+8, 3.6e+8]}", rf)), bare.revolution_frequency


def test_ring_without_cavity_nor_harmonic_number_warns_and_assumes_500_mhz(tmp_path):
    from acc_bluesky.profile import LimitError
    from acc_bluesky.twin import Twin

    path, frev = _cavityless(tmp_path, "")
    with pytest.warns(ProfileWarning, match=r"key 'rf.harmonic_number': the lattice bare.json has no RF cavity.*"
                                            r"h = \d+ is assumed.*set rf.harmonic_number"):
        p = load_profile(path)
    h, src = p.rf_harmonic_number
    assert src == "assumed" and h == round(500e6 / frev)
    assert abs(p.rf_nominal_frequency - 500e6) <= frev / 2  # the harmonic nearest 500 MHz (h = 1 before)
    twin = Twin(p, seed=None)
    assert twin.rf_nominal_frequency == p.rf_nominal_frequency == twin.rf_frequency_setpoint
    with pytest.raises(LimitError, match=r"RF frequency: -1.0 Hz refused: an RF frequency must be > 0 Hz"):
        twin.set_rf_frequency(-1.0)  # no limits in this profile: still never <= 0
    with pytest.raises(LimitError, match=r"must be > 0 Hz"):
        twin.set({"RF:frequency": 0.0})
    assert twin.rf_frequency_setpoint == p.rf_nominal_frequency


def test_ring_without_cavity_takes_the_profile_harmonic_number(tmp_path):
    path, frev = _cavityless(tmp_path, "rf: {harmonic_number: 1000, frequency_limits: [3.5e+8, 3.6e+8]}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileWarning)  # given: nothing to warn about
        p = load_profile(path)
    assert p.rf_harmonic_number == (1000, "profile") and p.rf_nominal_frequency == pytest.approx(1000 * frev)
    assert 3.5e8 < p.rf_nominal_frequency < 3.6e8 and p.warnings == []


def test_nominal_rf_outside_its_limits_warns(tmp_path):
    path, _ = _cavityless(tmp_path, "rf: {harmonic_number: 10, frequency_limits: [3.5e+8, 3.6e+8]}")
    with pytest.warns(ProfileWarning, match=r"key 'rf.frequency_limits': the nominal RF frequency .* is outside "
                                            r"\[3.5e\+08, 3.6e\+08\] Hz: every RF move will be refused"):
        load_profile(path)


def test_harmonic_number_below_one_refused(tmp_path):
    _refused(tmp_path, "rf: {frequency_limits: [3.5e+8, 3.6e+8]}",
             "rf: {harmonic_number: 0, frequency_limits: [3.5e+8, 3.6e+8]}", r"greater than or equal to 1",
             "rf.harmonic_number")
