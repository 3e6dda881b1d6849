"""Names of the twin's own Tango device and of the extra attributes the twin's server serves.

The machine's attributes (magnets, BPMs, orbit, RF, tunes, beam) are named by the profile's Tango templates through
:func:`acc_bluesky.devices.backends.tango.tango_names`, the single table shared by the server and the tango backend.
The names here are what only a simulated machine has (the twin control device), and the orbit rms attributes
(served next to the orbit, as the IOC's ``ORBIT:X-RMS``).
"""

from __future__ import annotations

from ..devices.backends.tango import split_attribute, tango_names
from ..profile import Profile

__all__ = ["twin_device_name", "orbit_rms_names", "TWIN_ATTRIBUTES", "served_names"]

#: Attributes of the twin control device (``{domain}/twin/control``): name -> what.
TWIN_ATTRIBUTES = {
    "Anomalies": "JSON of the active anomalies of the twin",
    "LastError": "the last write the server refused (attribute, value, why)",
    "Refused": "writes refused by the server's own checks so far (the attributes' min/max are Tango's)",
    "BeamLost": "the beam is lost",
    "LossReason": "why the beam is lost",
    "Version": "twin state version at the last publication",
    "Published": "publications so far (every publication pushes it last)",
    "Solves": "closed-orbit solves of the twin so far",
    "CycleTime": "duration of the last recomputation and publication [ms]",
    "Rate": "publications per second over the last ones [Hz]",
    "Seed": "error seed of the twin (-1: the ideal machine)",
    "Heartbeat": "+1 every second while the server runs",
    "Uptime": "seconds since the server started serving",
    "FaultsAllowed": "whether the Cmd command may inject faults (acc-bluesky tango-server --allow-faults)",
}


def twin_device_name(profile: Profile, domain: str | None = None) -> str:
    """The twin control device: ``{domain}/twin/control`` (anomaly commands, counters, last refusal)."""
    d = profile.spec.controls.tango_domain if domain is None else domain
    return f"{d}/twin/control"


def orbit_rms_names(names: dict[str, str]) -> dict[str, str]:
    """``{"orbit:x_rms": "<orbit x device>/<X attribute>Rms", ...}``: rms of the orbit over the BPMs that read [m]."""
    out = {}
    for plane in "xy":
        device, attr = split_attribute(names[f"orbit:{plane}"])
        out[f"orbit:{plane}_rms"] = f"{device}/{attr}Rms"
    return out


def served_names(profile: Profile, domain: str | None = None) -> dict[str, str]:
    """Every attribute the twin's server serves: :func:`tango_names`, the orbit rms and the twin's own."""
    names = tango_names(profile, domain)
    twin = twin_device_name(profile, domain)
    return names | orbit_rms_names(names) | {f"twin:{a}": f"{twin}/{a}" for a in TWIN_ATTRIBUTES}
