"""Startup of the ESRF-EBS profile for an RE Manager (``--startup-dir`` = this folder) or an IPython session.

Builds ``RE`` first, then the machine ``m`` (sim twin or EPICS, from ``$ACC_BLUESKY_MODE``/``$ACC_BLUESKY_SEED``),
its devices and the queue plans; see :mod:`acc_bluesky.queue.startup`. ``acc-bluesky queue start ebs`` uses it.
In IPython (``%run -i startup.py``, or as a startup file) it also gives ``cat`` (the catalogue), ``ap`` (the tool
plans: ``RE(ap.measure_orm(m))``; the bare ``measure_orm(...)`` is the queue's wrapper, machine already bound),
``bp``/``bps`` and a live-table ``bec``.
"""

from acc_bluesky.queue.startup import build_namespace as _build_namespace
from acc_bluesky.queue.startup import profile_from_startup_file as _profile_of

PROFILE = _profile_of(globals().get("__file__"), "ebs")  # this folder's profile.yaml (a copied folder works too)

globals().update(_build_namespace(PROFILE))
