"""Pydantic schema of a facility profile: data, not code.

The common case is one line per family:

.. code-block:: yaml

    families:
      QF2: {type: quadrupole, select: {name: "QF2"}, field: "PolynomB[1]", calibration: {linear: 0.005}}
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .calibration import Calibration, Limits

__all__ = [
    "FAMILY_TYPES",
    "Selector",
    "FamilySpec",
    "BpmSpec",
    "RfSpec",
    "ErrorSpec",
    "MagnetErrorSpec",
    "BpmErrorSpec",
    "InjectionErrorSpec",
    "ControlsSpec",
    "ProfileSpec",
    "LatticeSource",
    "GeneratedSpec",
    "ExcludedSpec",
    "ToolsSpec",
    "DEVICE_NAME_FIELDS",
    "PV_FIELDS",
    "BeamPvSpec",
    "check_pv_template",
    "format_device_name",
]

FAMILY_TYPES = ("hcor", "vcor", "quadrupole", "sextupole", "octupole", "skew", "dipole", "magnet")
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- device names and PV templates ------------------------------------------------------------------------
#: placeholders of a device-name template: family name, 1-based number in the family, lattice FamName
DEVICE_NAME_FIELDS = frozenset({"family", "n", "index", "element"})
#: placeholders allowed in each kind of PV template
PV_FIELDS = {
    "device": frozenset({"prefix", "family", "index", "device", "element", "name"}),  # one magnet / one BPM
    "family": frozenset({"prefix", "family"}),                                       # a family's waveforms
    "global": frozenset({"prefix"}),                                                  # orbit, RF, tunes, beam
}
_PER_DEVICE = frozenset({"index", "device", "element", "name"})
_SAMPLE = {"prefix": "P:", "family": "F", "index": 1, "n": 1, "device": "F_001", "element": "E1", "name": "E1"}


def _placeholders(template: str, what: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"{what} {template!r} is malformed ({err}): every '{{' needs its '}}' "
                         "(write '{{' for a literal brace)") from None
    names = []
    for _, fld, _, _ in parsed:
        if fld is None:
            continue
        if not fld.isidentifier():
            raise ValueError(f"{what} {template!r}: placeholder {{{fld}}} is not a plain name")
        names.append(fld)
    return names


def check_pv_template(template: str, kind: str, what: str = "PV template") -> str:
    """Validate a PV template of ``kind`` (``device``, ``family``, ``global``): known placeholders, balanced braces,
    a per-device placeholder where every device needs its own PV, a format that works. Returns the template."""
    allowed = PV_FIELDS[kind]
    names = _placeholders(template, what)
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ValueError(f"{what} {template!r}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                         f"known here: {', '.join('{' + a + '}' for a in sorted(allowed))}")
    if kind == "device" and not set(names) & _PER_DEVICE:
        raise ValueError(f"{what} {template!r} names every device alike: add {{device}} (or {{index}}) so each "
                         "device gets its own PV, e.g. '{prefix}{device}:I-SP'")
    try:
        template.format(**_SAMPLE)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"{what} {template!r} cannot be formatted ({err}); e.g. '{{index:03d}}' needs a number, "
                         "'{device}' a plain placeholder") from None
    return template


def _check_device_template(template: str) -> str:
    names = _placeholders(template, "device_names template")
    unknown = sorted(set(names) - DEVICE_NAME_FIELDS)
    if unknown:
        raise ValueError(f"device_names template {template!r}: unknown placeholder(s) "
                         f"{', '.join('{' + u + '}' for u in unknown)}; known: {{family}}, {{n}} (1-based), "
                         "{index} (= n), {element} (lattice FamName)")
    if not set(names) & {"n", "index", "element"}:
        raise ValueError(f"device_names template {template!r} gives every device the same name: use {{n:03d}} "
                         "or {element}")
    try:
        template.format(**_SAMPLE)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"device_names template {template!r} cannot be formatted ({err})") from None
    return template


def format_device_name(template: str, family: str, n: int, element: str) -> str:
    """The name of device number ``n`` (1-based) of ``family`` whose lattice element is ``element``."""
    return template.format(family=family, n=n, index=n, element=element)


class Selector(_Strict):
    """Which lattice elements: by pyAT class name and/or a regular expression on FamName (full match)."""

    class_: str | list[str] | None = Field(default=None, alias="class")
    name: str | None = None
    exclude: str | None = None
    strength: float | None = Field(default=None, allow_inf_nan=False, description=(
        "design value of the driven field (a family's 'field'; elsewhere the class's main multipole): elements "
        "with this value within 'rtol' (families of equal design strength)"))
    rtol: float = Field(default=1e-6, gt=0, lt=1, description="relative tolerance of 'strength'")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name", "exclude")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression {v!r}: {err}") from err
        return v

    @model_validator(mode="after")
    def _something(self):
        if self.class_ is None and self.name is None:
            raise ValueError("a selector needs 'class' and/or 'name'")
        return self

    @property
    def classes(self) -> list[str]:
        if self.class_ is None:
            return []
        return [self.class_] if isinstance(self.class_, str) else list(self.class_)


class LatticeOptions(_Strict):
    """Options of the lattice reader (:func:`acc_bluesky.profile.lattice_io.read_lattice`)."""

    strict: bool | None = None
    harmonic_number: int | None = Field(default=None, ge=1)
    periodicity: int | None = Field(default=None, ge=1)

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class LatticeSource(_Strict):
    """The lattice: a path (relative to the profile file) or a file shipped in a Python package."""

    path: str | None = None
    package: str | None = None
    file: str | None = None
    name: str | None = None  # pyAT load option (e.g. variable name in a .mat file)
    format: str | None = None  # override the extension: mat, m, json, repr, madx, mad8, elegant, tracy
    options: LatticeOptions = Field(default_factory=lambda: LatticeOptions(), description=(
        "reader options: strict (MAD-X: false sets undefined variables to 0), harmonic_number (Tracy), "
        "periodicity"))

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, v):
        if isinstance(v, str):
            return {"path": v}
        return v

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.package is None):
            raise ValueError("lattice needs either 'path' or {package, file}")
        if self.package is not None and not self.file:
            raise ValueError("lattice {package: ...} needs 'file'")
        return self


class FamilySpec(_Strict):
    """A family of magnets driven by one element field."""

    type: Literal["hcor", "vcor", "quadrupole", "sextupole", "octupole", "skew", "dipole", "magnet"]
    select: Selector
    field: str = "PolynomB[1]"
    calibration: Calibration = Calibration(linear=1.0)
    limits: Limits = Limits()
    units: str = "A"
    physics_units: str = ""
    status: dict[Literal["bad"], list[int | str]] = Field(default_factory=lambda: {"bad": []})
    ramp_rate: float | None = Field(default=None, gt=0, description="A/s; None = instantaneous")
    pv: dict[Literal["setpoint", "readback", "setpoints", "readbacks"], str] = Field(
        default_factory=dict, description="PV templates of this family, overriding controls: magnet_setpoint, "
        "magnet_readback, family_setpoints, family_readbacks")
    device_names: str = Field(default="{family}_{n:03d}", description=(
        "name of each device, the one string used everywhere (devices, runs, status.bad, PVs' {device}): "
        "placeholders {family}, {n} (1-based), {element} (lattice FamName, where unique per device)"))
    description: str = ""

    @field_validator("device_names")
    @classmethod
    def _names(cls, v):
        return _check_device_template(v)

    @field_validator("pv")
    @classmethod
    def _pv(cls, v):
        for k, t in v.items():
            check_pv_template(t, "device" if k in ("setpoint", "readback") else "family", f"pv.{k} template")
        return v

    @field_validator("field")
    @classmethod
    def _field(cls, v):
        if not _FIELD_RE.match(v):
            raise ValueError(f"field must look like 'K', 'H', 'KickAngle[0]' or 'PolynomB[1]', got {v!r}")
        return v

    @property
    def field_parts(self) -> tuple[str, int | None]:
        m = _FIELD_RE.match(self.field)
        attr, idx = m.group(1), m.group(2)
        return attr, (int(idx) if idx is not None else None)


class BpmSpec(_Strict):
    """Beam position monitors: one line selects all of them."""

    select: Selector = Selector(**{"class": "Monitor"})
    status: dict[Literal["bad"], list[int | str]] = Field(default_factory=lambda: {"bad": []})
    rate: float | None = Field(default=None, gt=0, description="acquisition rate [Hz]; None = every read")
    pv: dict[Literal["x", "y"], str] = Field(default_factory=dict, description="PV templates overriding controls.bpm_x/y")
    device_names: str = Field(default="BPM_{n:03d}", description=(
        "name of each BPM: placeholders {n} (1-based), {element} (lattice FamName, where unique), {family} (BPM)"))

    @field_validator("device_names")
    @classmethod
    def _names(cls, v):
        return _check_device_template(v)

    @field_validator("pv")
    @classmethod
    def _pv(cls, v):
        for k, t in v.items():
            check_pv_template(t, "device", f"pv.{k} template")
        if "x" in v and v.get("x") == v.get("y"):
            raise ValueError(f"pv.x and pv.y are the same template {v['x']!r}: the two planes need different PVs")
        return v


class RfSpec(_Strict):
    frequency_limits: Limits = Limits()
    voltage_limits: Limits = Limits(low=0.0)
    harmonic_number: int | None = Field(default=None, ge=1, description=(
        "RF harmonic number: the nominal RF frequency is harmonic_number x the revolution frequency when the "
        "lattice has no cavity (without it a ring assumes the harmonic nearest 500 MHz); Tracy: passed to the "
        "reader"))
    pv: dict[Literal["frequency", "frequency_rb", "voltage"], str] = Field(
        default_factory=dict, description="PV templates overriding controls.rf_frequency, rf_frequency_rb, rf_voltage")

    @field_validator("pv")
    @classmethod
    def _pv(cls, v):
        for k, t in v.items():
            check_pv_template(t, "global", f"pv.{k} template")
        return v


class MagnetErrorSpec(_Strict):
    """rms errors applied to the selected elements (truncated Gaussian)."""

    select: Selector
    dx: float = Field(default=0.0, ge=0, description="m rms")
    dy: float = Field(default=0.0, ge=0, description="m rms")
    roll: float = Field(default=0.0, ge=0, description="rad rms")
    field: float = Field(default=0.0, ge=0, description="relative rms of the main field")


class BpmErrorSpec(_Strict):
    offset: float = Field(default=0.0, ge=0, description="m rms")
    gain: float = Field(default=0.0, ge=0, description="relative rms")
    roll: float = Field(default=0.0, ge=0, description="rad rms")
    noise: float = Field(default=0.0, ge=0, description="m rms per reading (closed orbit)")
    tbt_noise: float = Field(default=0.0, ge=0, description="m rms per turn (trajectory)")


# --- tbt: injected beam (twin/beam.py) -----------------------------------------------------------------------
class InjectionErrorSpec(_Strict):
    """Errors of the injected beam: a static offset per seed (rms, truncated) and a shot-to-shot jitter (rms).

    Defaults from commissioning-simulation tables (SC toolkit): 0.5 mm / 0.2 mrad static, 10 um / 10 urad jitter,
    energy 1e-3."""

    x: float = Field(default=0.5e-3, ge=0, description="m rms static offset")
    px: float = Field(default=0.2e-3, ge=0, description="rad rms static angle")
    y: float = Field(default=0.5e-3, ge=0, description="m rms static offset")
    py: float = Field(default=0.2e-3, ge=0, description="rad rms static angle")
    energy: float = Field(default=1.0e-3, ge=0, description="relative rms static energy offset dp/p")
    jitter_x: float = Field(default=10.0e-6, ge=0, description="m rms per shot")
    jitter_px: float = Field(default=10.0e-6, ge=0, description="rad rms per shot")
    jitter_y: float = Field(default=10.0e-6, ge=0, description="m rms per shot")
    jitter_py: float = Field(default=10.0e-6, ge=0, description="rad rms per shot")
    jitter_energy: float = Field(default=0.0, ge=0, description="relative rms per shot")


# --- end tbt ---------------------------------------------------------------------------------------------------


class ErrorSpec(_Strict):
    """Default error model of the twin (applied when a seed is given)."""

    truncation: float = Field(default=2.5, gt=0)
    scale: float = Field(default=1.0, ge=0, description="global multiplier on alignment errors")
    magnets: list[MagnetErrorSpec] = Field(default_factory=list)
    bpm: BpmErrorSpec = BpmErrorSpec()
    corrector_calibration: float = Field(default=0.0, ge=0, description="relative rms")
    rf_frequency: float = Field(default=0.0, ge=0, description="Hz rms offset of the true frequency")
    tune_noise: float = Field(default=0.0, ge=0, description="rms noise of the tune monitor")
    injection: InjectionErrorSpec = InjectionErrorSpec()  # tbt: errors of the injected beam (twin/beam.py)


# --- tango: the Tango templates of ControlsSpec and their check -------------------------------------------------
#: ControlsSpec Tango templates -> their kind: "device" (per magnet/BPM), "family" or "global"
TANGO_TEMPLATES = {
    "tango_magnet_setpoint": "device", "tango_magnet_readback": "device", "tango_family_setpoints": "family",
    "tango_family_readbacks": "family", "tango_bpm_x": "device", "tango_bpm_y": "device", "tango_orbit_x": "global",
    "tango_orbit_y": "global", "tango_rf_frequency": "global", "tango_rf_frequency_rb": "global",
    "tango_rf_voltage": "global", "tango_tune_x": "global", "tango_tune_y": "global", "tango_beam_current": "global",
    "tango_beam_lifetime": "global",
}
_TANGO_FIELDS = {"device": ("domain", "device", "element", "family", "index", "name"),
                 "family": ("domain", "family"), "global": ("domain",)}
_TANGO_PART = re.compile(r"^[A-Za-z0-9_.:+\-]+$")


def check_tango_template(template: str, kind: str, where: str) -> None:
    """Refuse a Tango template that cannot make ``domain/family/member/attribute`` names, naming ``where``."""
    allowed = _TANGO_FIELDS[kind]
    sample = {"domain": "d", "device": "DEV_001", "element": "EL", "family": "FAM", "index": 1, "name": "EL"}
    try:
        text = template.format(**{k: sample[k] for k in allowed})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where} {template!r}: placeholders of a {kind} template are "
                         f"{', '.join('{' + a + '}' for a in allowed)} ({type(err).__name__}: {err})") from None
    parts = text.split("/")
    if len(parts) != 4 or not all(_TANGO_PART.match(x) for x in parts):
        raise ValueError(f"{where} {template!r} gives {text!r}: a Tango attribute name is "
                         "domain/family/member/attribute (4 parts, no blanks; no tango://host: the address is "
                         "given to connect())")


# --- end tango -------------------------------------------------------------------------------------------------


_CONTROLS_TEMPLATES = {
    "magnet_setpoint": "device", "magnet_readback": "device", "family_setpoints": "family",
    "family_readbacks": "family", "bpm_x": "device", "bpm_y": "device", "orbit_x": "global", "orbit_y": "global",
    "rf_frequency": "global", "rf_frequency_rb": "global", "rf_voltage": "global", "tune_x": "global",
    "tune_y": "global", "beam_current": "global", "beam_lifetime": "global",
}


# --- tbt: PVs of the beam devices (BPM acquisition modes, TbT readout, pinger, injection, losses) ---------------
class BeamPvSpec(_Strict):
    """PV templates (placeholder ``{prefix}``) of the beam devices: the BPM system's acquisition mode and turns and
    its turn-by-turn readout (waveforms of n_bpm x turns values, BPM after BPM), the pinger, the injection
    steering and the beam-loss monitor. A control system that serves them sets ``controls.beam_pvs: {}`` (these
    defaults) or its own names; without it, ``connect(..., mode="epics")`` builds no beam devices."""

    @model_validator(mode="after")
    def _templates(self):
        for key in type(self).model_fields:
            check_pv_template(getattr(self, key), "global", f"controls.beam_pvs.{key} template")
        return self

    bpm_mode: str = "{prefix}BPM:MODE"
    bpm_turns: str = "{prefix}BPM:TURNS"
    bpm_acquire: str = "{prefix}BPM:ACQUIRE"
    tbt_x: str = "{prefix}TBT:X"
    tbt_y: str = "{prefix}TBT:Y"
    pinger_x: str = "{prefix}PINGER:X-SP"
    pinger_y: str = "{prefix}PINGER:Y-SP"
    pinger_fire: str = "{prefix}PINGER:FIRE"
    injection_x: str = "{prefix}INJ:X-SP"
    injection_px: str = "{prefix}INJ:PX-SP"
    injection_y: str = "{prefix}INJ:Y-SP"
    injection_py: str = "{prefix}INJ:PY-SP"
    injection_energy: str = "{prefix}INJ:DP-SP"
    injection_fire: str = "{prefix}INJ:FIRE"
    loss_turn: str = "{prefix}LOSS:TURN"
    loss_element: str = "{prefix}LOSS:ELEMENT"
    loss_element_name: str = "{prefix}LOSS:ELEMENT-NAME"
    loss_s: str = "{prefix}LOSS:S"
    loss_bpms: str = "{prefix}LOSS:BPMS-REACHED"
    loss_turns: str = "{prefix}LOSS:TURNS-REACHED"
    loss_transmission: str = "{prefix}LOSS:TRANSMISSION"
# --- end tbt ---------------------------------------------------------------------------------------------------


class ControlsSpec(_Strict):
    """Control-system names. Per-device templates use {prefix}, {device} (the device name), {element} (lattice
    FamName), {family}, {index} (1-based); family templates {prefix}, {family}; the others {prefix}."""

    @model_validator(mode="after")
    def _templates(self):
        for key, kind in _CONTROLS_TEMPLATES.items():
            check_pv_template(getattr(self, key), kind, f"controls.{key} template")
        if self.bpm_x == self.bpm_y:
            raise ValueError(f"controls.bpm_x and controls.bpm_y are the same template {self.bpm_x!r}: the two planes "
                             "need different PVs")
        return self

    prefix: str = "SIM:"
    magnet_setpoint: str = "{prefix}{device}:I-SP"
    magnet_readback: str = "{prefix}{device}:I-RB"
    family_setpoints: str = "{prefix}{family}:I-SP"
    family_readbacks: str = "{prefix}{family}:I-RB"
    bpm_x: str = "{prefix}{device}:X"
    bpm_y: str = "{prefix}{device}:Y"
    orbit_x: str = "{prefix}ORBIT:X"
    orbit_y: str = "{prefix}ORBIT:Y"
    rf_frequency: str = "{prefix}RF:FREQ-SP"
    rf_frequency_rb: str = "{prefix}RF:FREQ-RB"
    rf_voltage: str = "{prefix}RF:VOLT-SP"
    tune_x: str = "{prefix}TUNE:X"
    tune_y: str = "{prefix}TUNE:Y"
    beam_current: str = "{prefix}BEAM:CURRENT"
    beam_lifetime: str = "{prefix}BEAM:LIFETIME"
    beam_pvs: BeamPvSpec | None = Field(default=None, description="PVs of the beam devices (tbt, pinger, injection, "
                                        "losses) when the control system serves them")
    alarms: AlarmsSpec = Field(default_factory=lambda: AlarmsSpec(),
                               description="alarm limits of the IOC's beam current, lifetime and orbit rms PVs")
    # --- tango: Tango attribute names (devices/backends/tango.py, the tango server) ------------------------------
    # "domain/family/member/attribute", one line per kind as the PV templates. Per-device templates use {domain},
    # {device} (the device name), {element} (lattice FamName), {family}, {index} (1-based); family templates
    # {domain}, {family}; the others {domain}. A read-write attribute that reads back its own setpoint serves both
    # keys of a pair (rf_frequency and rf_frequency_rb below name the same attribute).
    tango_domain: str = Field(default="sim", description="Tango domain of the machine's devices")
    tango_magnet_setpoint: str = "{domain}/{family}/{device}/CurrentSetpoint"
    tango_magnet_readback: str = "{domain}/{family}/{device}/Current"
    tango_family_setpoints: str = "{domain}/{family}/all/CurrentSetpoints"
    tango_family_readbacks: str = "{domain}/{family}/all/Currents"
    tango_bpm_x: str = "{domain}/bpm/{device}/X"
    tango_bpm_y: str = "{domain}/bpm/{device}/Y"
    tango_orbit_x: str = "{domain}/orbit/all/X"
    tango_orbit_y: str = "{domain}/orbit/all/Y"
    tango_rf_frequency: str = "{domain}/rf/main/Frequency"
    tango_rf_frequency_rb: str = "{domain}/rf/main/Frequency"
    tango_rf_voltage: str = "{domain}/rf/main/Voltage"
    tango_tune_x: str = "{domain}/tune/main/Qx"
    tango_tune_y: str = "{domain}/tune/main/Qy"
    tango_beam_current: str = "{domain}/beam/main/Current"
    tango_beam_lifetime: str = "{domain}/beam/main/Lifetime"
    tango_setpoints_from_write_value: bool = Field(
        default=False, description="the magnet setpoint templates name read-write attributes that read the measured "
        "current (one attribute per supply): the setpoint signals read the attributes' write value instead")

    @model_validator(mode="after")
    def _tango_templates(self):
        for key, kind in TANGO_TEMPLATES.items():
            check_tango_template(getattr(self, key), kind, f"controls.{key}")
        check_tango_template(self.tango_domain + "/a/b/c", "global", "controls.tango_domain")
        if self.tango_bpm_x == self.tango_bpm_y:
            raise ValueError(f"controls.tango_bpm_x and tango_bpm_y are the same template {self.tango_bpm_x!r}: the "
                             "two planes need different attributes")
        return self
    # --- end tango -------------------------------------------------------------------------------------------------


_SEVERITY = Literal["NO_ALARM", "MINOR", "MAJOR", "INVALID"]


class AlarmLimits(_Strict):
    """EPICS alarm limits of one analog PV (HIHI/HIGH/LOW/LOLO and their severities), in the PV's units.

    A limit left out (``null``) raises no alarm; ``hysteresis`` is the record's HYST (a value must come back by
    that much before the alarm clears)."""

    lolo: float | None = None
    low: float | None = None
    high: float | None = None
    hihi: float | None = None
    lolo_severity: _SEVERITY = "MAJOR"
    low_severity: _SEVERITY = "MINOR"
    high_severity: _SEVERITY = "MINOR"
    hihi_severity: _SEVERITY = "MAJOR"
    hysteresis: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _finite_and_ordered(self):
        import math

        given = [(k, getattr(self, k)) for k in ("lolo", "low", "high", "hihi") if getattr(self, k) is not None]
        for k, v in given + [("hysteresis", self.hysteresis)]:
            if not math.isfinite(v):
                raise ValueError(f"alarm limit {k} must be a finite number, got {v!r}")
        for (k1, v1), (k2, v2) in zip(given, given[1:]):
            if v1 > v2:
                raise ValueError(f"alarm limits must be ordered lolo <= low <= high <= hihi, got {k1}={v1:g} > "
                                 f"{k2}={v2:g}")
        return self


class AlarmsSpec(_Strict):
    """Alarm limits of the machine-wide PVs the IOC serves (defaults suit a storage ring of any current)."""

    beam_current: AlarmLimits = AlarmLimits(lolo=1.0e-3)  # A: below 1 mA there is no stored beam (MAJOR)
    beam_lifetime: AlarmLimits = AlarmLimits(lolo=600.0, low=3600.0)  # s
    orbit_rms_x: AlarmLimits = AlarmLimits(high=2.0e-3, hihi=5.0e-3)  # m, rms over the BPMs
    orbit_rms_y: AlarmLimits = AlarmLimits(high=1.0e-3, hihi=2.5e-3)  # m


class BeamSpec(_Strict):
    current: float = Field(default=0.2, ge=0, description="A after injection")
    lifetime: float = Field(default=20 * 3600.0, gt=0, description="s")
    aperture_x: float = Field(default=10e-3, gt=0, description="m: |x| at a BPM beyond this loses the beam")
    aperture_y: float = Field(default=5e-3, gt=0, description="m")


# -- tool defaults (typed: a wrong type is refused at load, not when the tool runs) -----------------------
class _ToolDefaults(BaseModel):
    """Known keys are typed (strict: ``"big"`` is not a step, ``2.7`` is not a count); other keys pass through."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class OrbitResponseDefaults(_ToolDefaults):
    delta: float | None = Field(default=None, gt=0, description="corrector half step [A]")
    delta_physics: float | None = Field(default=None, gt=0, description="corrector half step [rad]")
    df: float | None = Field(default=None, gt=0, description="RF half step [Hz]")
    n_avg: int | None = Field(default=None, ge=1)


class OrbitCorrectionDefaults(_ToolDefaults):
    rcond: float | None = Field(default=None, gt=0, lt=1, description="relative singular-value cut")
    n_sv: int | None = Field(default=None, ge=1)
    gain: float | None = Field(default=None, gt=0, le=1)
    max_iter: int | None = Field(default=None, ge=1)
    tikhonov: float | None = Field(default=None, ge=0)
    min_improvement: float | None = Field(default=None, ge=0, lt=1)
    n_avg: int | None = Field(default=None, ge=1)


class DispersionDefaults(_ToolDefaults):
    df: float | None = Field(default=None, gt=0, description="RF step [Hz]")
    n_steps: int | None = Field(default=None, ge=1)
    n_avg: int | None = Field(default=None, ge=1)


class ChromaticityDefaults(_ToolDefaults):
    dp_max: float | None = Field(default=None, gt=0, lt=0.1, description="largest dp/p of the scan")
    steps: int | None = Field(default=None, ge=2)
    order: int | None = Field(default=None, ge=1, le=3)
    n_avg: int | None = Field(default=None, ge=1)


class TuneDefaults(_ToolDefaults):
    n_avg: int | None = Field(default=None, ge=1)
    delta: float | None = Field(default=None, gt=0, description="quadrupole family step [A]")


_TOOL_MODELS: dict[str, type[_ToolDefaults]] = {
    "orbit_response": OrbitResponseDefaults, "orbit_correction": OrbitCorrectionDefaults,
    "dispersion": DispersionDefaults, "chromaticity": ChromaticityDefaults, "tune": TuneDefaults,
}


class ToolsSpec(BaseModel):
    """``tools.<tool>``: default parameters of each tool; the known ones typed. Read with :meth:`get`."""

    model_config = ConfigDict(extra="allow")
    orbit_response: OrbitResponseDefaults | None = None
    orbit_correction: OrbitCorrectionDefaults | None = None
    dispersion: DispersionDefaults | None = None
    chromaticity: ChromaticityDefaults | None = None
    tune: TuneDefaults | None = None

    @model_validator(mode="after")
    def _extra_are_mappings(self):
        for k, v in (self.model_extra or {}).items():
            if not isinstance(v, dict):
                raise ValueError(f"tools.{k} must be a mapping of parameter: value, got {v!r}")
        return self

    def get(self, tool: str, default: Any = None) -> dict[str, Any] | Any:
        """The defaults of ``tool`` as a plain dict (only the keys the profile gives), or ``default``."""
        v = getattr(self, tool, None) if tool in _TOOL_MODELS else (self.model_extra or {}).get(tool)
        if v is None:
            return default
        return v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else dict(v)

    def __getitem__(self, tool: str) -> dict[str, Any]:
        v = self.get(tool)
        if v is None:
            raise KeyError(tool)
        return v

    def __contains__(self, tool: str) -> bool:
        return self.get(tool) is not None

    def keys(self) -> list[str]:
        return [k for k in (*_TOOL_MODELS, *(self.model_extra or {})) if self.get(k) is not None]

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        return [(k, self.get(k)) for k in self.keys()]


# -- what the generator decided (written by `profile new`, shown by `profile check`) ----------------------
class ExcludedSpec(_Strict):
    """Lattice elements the generator left out on purpose, and why (one line each)."""

    select: Selector
    count: int = Field(ge=0)
    reason: str


class GeneratedSpec(_Strict):
    """Provenance and decisions of ``acc-bluesky profile new``: notes, warnings, excluded elements, error sizing."""

    by: str = ""
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    excluded: list[ExcludedSpec] = Field(default_factory=list)
    errors: str = ""


_TWISS_KEYS = {"beta": 2, "alpha": 2, "dispersion": 4, "closed_orbit": 6, "mu": 2}


class ProfileSpec(_Strict):
    """One accelerator: its lattice, families, calibrations, limits, names and tool defaults."""

    facility: str
    accelerator: str
    description: str = ""
    energy: float = Field(gt=0, allow_inf_nan=False, description="beam energy [eV]")
    lattice: LatticeSource
    kind: Literal["ring", "line"] = "ring"
    orbit_model: Literal["4d", "6d"] = "4d"
    bpm: BpmSpec = BpmSpec()
    families: dict[str, FamilySpec]
    rf: RfSpec = RfSpec()
    beam: BeamSpec = BeamSpec()
    errors: ErrorSpec = ErrorSpec()
    controls: ControlsSpec = ControlsSpec()
    tools: ToolsSpec = Field(default_factory=ToolsSpec)
    twiss_in: dict[str, list[float] | float] | None = None  # for lines: initial optics
    generated: GeneratedSpec | None = None

    @model_validator(mode="after")
    def _families(self):
        if not self.families:
            raise ValueError("a profile needs at least one family")
        return self

    @field_validator("twiss_in")
    @classmethod
    def _twiss(cls, v):
        if v is None:
            return v
        for k, val in v.items():
            if k not in _TWISS_KEYS:
                raise ValueError(f"twiss_in: unknown key {k!r}; expected {sorted(_TWISS_KEYS)} (beta [m], alpha, "
                                 "dispersion [m, rad, m, rad], closed_orbit (6,), mu [rad])")
            vals = [val] if isinstance(val, (int, float)) else list(val)
            if len(vals) > _TWISS_KEYS[k] or (k in ("beta", "alpha") and len(vals) != 2):
                raise ValueError(f"twiss_in.{k}: {len(vals)} values, expected {_TWISS_KEYS[k]}")
            if not all(math.isfinite(float(x)) for x in vals):
                raise ValueError(f"twiss_in.{k}: values must be finite numbers, got {vals}")
            if k == "beta" and min(vals) <= 0:
                raise ValueError(f"twiss_in.beta: beta functions must be > 0 [m], got {vals}")
        return v
