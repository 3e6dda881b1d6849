"""Pydantic schema of a facility profile: data, not code.

The common case is one line per family:

.. code-block:: yaml

    families:
      QF2: {type: quadrupole, select: {name: "QF2"}, field: "PolynomB[1]", calibration: {linear: 0.005}}
"""

from __future__ import annotations

import re
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
]

FAMILY_TYPES = ("hcor", "vcor", "quadrupole", "sextupole", "octupole", "skew", "dipole", "magnet")
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Selector(_Strict):
    """Which lattice elements: by pyAT class name and/or a regular expression on FamName (full match)."""

    class_: str | list[str] | None = Field(default=None, alias="class")
    name: str | None = None
    exclude: str | None = None

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


class LatticeSource(_Strict):
    """The lattice: a path (relative to the profile file) or a file shipped in a Python package."""

    path: str | None = None
    package: str | None = None
    file: str | None = None
    name: str | None = None  # pyAT load option (e.g. variable name in a .mat file)

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
    description: str = ""

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


class RfSpec(_Strict):
    frequency_limits: Limits = Limits()
    voltage_limits: Limits = Limits(low=0.0)
    harmonic_number: int | None = None
    pv: dict[Literal["frequency", "frequency_rb", "voltage"], str] = Field(
        default_factory=dict, description="PV templates overriding controls.rf_frequency, rf_frequency_rb, rf_voltage")


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


class ControlsSpec(_Strict):
    """Control-system names. Templates use {prefix}, {family}, {index} (1-based), {name}."""

    prefix: str = "SIM:"
    magnet_setpoint: str = "{prefix}{family}:{index:03d}:I-SP"
    magnet_readback: str = "{prefix}{family}:{index:03d}:I-RB"
    family_setpoints: str = "{prefix}{family}:I-SP"
    family_readbacks: str = "{prefix}{family}:I-RB"
    bpm_x: str = "{prefix}BPM:{index:03d}:X"
    bpm_y: str = "{prefix}BPM:{index:03d}:Y"
    orbit_x: str = "{prefix}ORBIT:X"
    orbit_y: str = "{prefix}ORBIT:Y"
    rf_frequency: str = "{prefix}RF:FREQ-SP"
    rf_frequency_rb: str = "{prefix}RF:FREQ-RB"
    rf_voltage: str = "{prefix}RF:VOLT-SP"
    tune_x: str = "{prefix}TUNE:X"
    tune_y: str = "{prefix}TUNE:Y"
    beam_current: str = "{prefix}BEAM:CURRENT"
    beam_lifetime: str = "{prefix}BEAM:LIFETIME"
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


class ProfileSpec(_Strict):
    """One accelerator: its lattice, families, calibrations, limits, names and tool defaults."""

    facility: str
    accelerator: str
    description: str = ""
    energy: float = Field(gt=0, description="beam energy [eV]")
    lattice: LatticeSource
    kind: Literal["ring", "line"] = "ring"
    orbit_model: Literal["4d", "6d"] = "4d"
    bpm: BpmSpec = BpmSpec()
    families: dict[str, FamilySpec]
    rf: RfSpec = RfSpec()
    beam: BeamSpec = BeamSpec()
    errors: ErrorSpec = ErrorSpec()
    controls: ControlsSpec = ControlsSpec()
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict)
    twiss_in: dict[str, list[float] | float] | None = None  # for lines: initial optics

    @model_validator(mode="after")
    def _families(self):
        if not self.families:
            raise ValueError("a profile needs at least one family")
        return self
