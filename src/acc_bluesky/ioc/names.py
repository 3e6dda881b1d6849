"""PV names of the twin IOC's own control PVs and of the digital shadow.

The machine PVs (magnets, BPMs, RF, tunes, beam) are named by the profile's templates through
:func:`acc_bluesky.devices.backends.pv_names`, the single table shared by the IOC and the epics backend. The names
here are the extras that only a simulated machine or a shadow has, under the same prefix (or the shadow's).
"""

from __future__ import annotations

from ..profile import Profile

__all__ = ["twin_pv_names", "shadow_pv_names", "default_shadow_prefix", "orbit_rms_pv_names", "magnet_pv", "bpm_pv",
           "FAULT_KEYS"]

#: logical key -> suffix after ``{prefix}TWIN:``
_TWIN = {
    "cmd": "CMD",                  # stringout: anomaly / control commands ("dead_bpm 5", "trip QF2", "clear", ...)
    "cmd_result": "CMD-RESULT",    # long string: outcome of the last command
    "anomalies": "ANOMALIES",      # long string: JSON of the active anomalies
    "last_error": "LAST-ERROR",    # long string: last refused put (PV, value, why)
    "refused": "REFUSED",          # longin: count of refused puts
    "beam_lost": "BEAM-LOST",      # bi
    "loss_reason": "LOSS-REASON",  # long string
    "version": "VERSION",          # int64in: twin state version at the last publication
    "published": "PUBLISHED",      # int64in: publication counter (last record of every publication)
    "solves": "SOLVES",            # int64in: closed-orbit solves of the twin so far
    "cycle_time": "CYCLE-TIME",    # ai [ms]: duration of the last recomputation + publication
    "rate": "RATE",                # ai [Hz]: publications per second over the last seconds
    "seed": "SEED",                # longin: error seed (-1 = ideal machine)
    "heartbeat": "HEARTBEAT",      # longin: +1 every second while the IOC runs
    "uptime": "UPTIME",            # ai [s]: time since the IOC started serving
}

#: The fault-injection PVs, served only by an IOC started with ``--allow-faults``.
FAULT_KEYS = ("cmd", "cmd_result")

#: logical key -> suffix after the shadow prefix
_SHADOW = {
    "orbit:x_model": "ORBIT:X-MODEL",
    "orbit:y_model": "ORBIT:Y-MODEL",
    "orbit:x_residual": "ORBIT:X-RESID",
    "orbit:y_residual": "ORBIT:Y-RESID",
    "orbit:x_rms": "ORBIT:X-RESID-RMS",     # rms of (residual - reference) [m]
    "orbit:y_rms": "ORBIT:Y-RESID-RMS",
    "tune:x_model": "TUNE:X-MODEL",
    "tune:y_model": "TUNE:Y-MODEL",
    "tune:x_residual": "TUNE:X-RESID",
    "tune:y_residual": "TUNE:Y-RESID",
    "anomaly": "ANOMALY",                   # bi: 1 while residuals/readbacks exceed the thresholds
    "anomaly_reason": "ANOMALY:REASON",     # long string
    "anomaly_count": "ANOMALY:COUNT",       # longin: rising edges so far
    "threshold:orbit": "THRESHOLD:ORBIT",   # ao [m]: rms orbit residual change that raises the flag
    "threshold:tune": "THRESHOLD:TUNE",     # ao: tune residual change that raises the flag
    "threshold:readback": "THRESHOLD:RB",   # ao [A]: |readback - setpoint| that raises the flag
    "rebaseline": "REBASELINE",             # bo: take the present residuals as the reference
    "updates": "UPDATES",                   # int64in: model evaluations so far
    "snapshots": "SNAPSHOTS",               # longin: runs written to Tiled so far
    "connected": "CONNECTED",               # bi: all followed PVs of the live machine are connected
}


def twin_pv_names(profile: Profile, prefix: str | None = None) -> dict[str, str]:
    """The twin IOC's control PVs: logical key -> PV name, under the profile's prefix (or ``prefix``).

    The :data:`FAULT_KEYS` among them exist only on an IOC started with ``--allow-faults``."""
    p = profile.spec.controls.prefix if prefix is None else prefix
    return {k: f"{p}TWIN:{v}" for k, v in _TWIN.items()}


def orbit_rms_pv_names(profile: Profile, prefix: str | None = None) -> dict[str, str]:
    """The IOC's orbit rms PVs [m] (with the profile's alarm limits): each orbit waveform's name + ``-RMS``."""
    from ..devices import pv_names

    t = pv_names(profile, prefix)
    return {"orbit:x_rms": t["orbit:x"] + "-RMS", "orbit:y_rms": t["orbit:y"] + "-RMS"}


def magnet_pv(pvs: dict[str, str], profile: Profile, family: str, index: int, what: str) -> str:
    """The ``what`` (``setpoint`` or ``readback``) PV of magnet ``index`` (0-based) of ``family`` in the table
    ``pvs`` of :func:`acc_bluesky.devices.pv_names` (keyed by device name, or by the older ``FAMILY:NNN``)."""
    names = profile.families[family].device_names
    index = index % len(names)  # -1: the last one
    dev = names[index]
    for key in (f"{dev}:{what}", f"{family}:{index + 1:03d}:{what}"):
        if key in pvs:
            return pvs[key]
    raise KeyError(f"no {what} PV of {dev} ({family} #{index + 1}) in the PV table of acc_bluesky.devices.pv_names")


def bpm_pv(pvs: dict[str, str], profile: Profile, index: int, plane: str) -> str:
    """The ``plane`` (``x`` or ``y``) PV of BPM ``index`` (0-based) in the table ``pvs`` (see :func:`magnet_pv`)."""
    index = index % len(profile.bpm_names)  # -1: the last one
    dev = profile.bpm_names[index]
    for key in (f"{dev}:{plane}", f"BPM:{index + 1:03d}:{plane}"):
        if key in pvs:
            return pvs[key]
    raise KeyError(f"no {plane} PV of BPM {dev} (#{index + 1}) in the PV table of acc_bluesky.devices.pv_names")


def default_shadow_prefix(profile: Profile, prefix: str | None = None) -> str:
    """``{machine prefix}SHADOW:``: where the shadow publishes unless told otherwise."""
    p = profile.spec.controls.prefix if prefix is None else prefix
    return f"{p}SHADOW:"


def shadow_pv_names(profile: Profile, shadow_prefix: str | None = None, prefix: str | None = None) -> dict[str, str]:
    """The shadow's PVs: logical key -> PV name under ``shadow_prefix`` (default ``{prefix}SHADOW:``)."""
    s = default_shadow_prefix(profile, prefix) if shadow_prefix is None else shadow_prefix
    return {k: f"{s}{v}" for k, v in _SHADOW.items()}
