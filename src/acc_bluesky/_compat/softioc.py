"""pythonSoftIOC (4.7) internals the twin IOC needs, each function tiny; checked by ``tests/test_compat.py``.

pythonSoftIOC has no public way to do either of these:

1. **Fail a put at its client.** A ``validate`` callback that returns False keeps the old value, but the Channel
   Access put-callback (``caput -w``, ophyd-async ``set``) and a PV Access put with ``block`` still report
   success: EPICS ignores a record's processing status for a put with completion (``dbNotify``). The put's outcome
   is the ``status`` of the ``processNotify`` in progress, which the record points to (``dbCommon.ppn``) while it
   processes; set to ``notifyError``, the CA server replies ``ECA_PUTFAIL`` and QSRV an error. (A PVA put without
   ``block`` already fails: QSRV returns the processing status.)
2. **Show a value on an output record without processing it** (no ``validate``, no ``on_update``):
   ``set(value, process=False)`` writes VAL but posts no monitor, so the monitor is posted here
   (``db_post_events``, EPICS' public C API) under the record's lock.

``record`` below is what ``softioc.builder`` returns (or the device a ``validate`` callback receives).
"""

from __future__ import annotations

import ctypes
from functools import cache

from epicscorelibs.ioc import dbCore
from softioc.fields import RecordFactory
from softioc.imports import get_field_offsets

__all__ = ["NOTIFY_ERROR", "ProcessNotify", "fail_put", "show"]

#: ``notifyStatus`` of dbNotify.h: notifyOK, notifyCanceled, notifyError, notifyPutDisabled
NOTIFY_ERROR = 2
_DBE_VALUE, _DBE_LOG = 1, 2


class ProcessNotify(ctypes.Structure):
    """The head of dbNotify.h's ``processNotify`` up to ``status``: ``ellCheckNode restartNode`` (ELLNODE's
    next/previous pointers, ``int isOnList``), ``void *pnotifyPvt``, ``notifyStatus status``."""

    _fields_ = [("next", ctypes.c_void_p), ("previous", ctypes.c_void_p), ("isOnList", ctypes.c_int),
                ("pnotifyPvt", ctypes.c_void_p), ("status", ctypes.c_int)]


_lock = dbCore.dbScanLock
_lock.argtypes, _lock.restype = (ctypes.c_void_p,), None
_unlock = dbCore.dbScanUnlock
_unlock.argtypes, _unlock.restype = (ctypes.c_void_p,), None
_post = dbCore.db_post_events
_post.argtypes, _post.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint), ctypes.c_int


@cache
def _offset(rtype: str, field: str) -> int:
    return get_field_offsets(rtype)[field][0]


@cache
def _state(rtype: str) -> RecordFactory:
    return RecordFactory(rtype, ["PACT", "RPRO"])


def _address(record) -> int:
    return record._record.record.value  # the device's wrapped dbCommon pointer (set at init_record)


def fail_put(record, severity: int, status: int) -> bool:
    """Make the put being processed on ``record`` fail at its client, and give the record this alarm.

    Call it from the record's ``validate`` callback (or, for a blocking record, before its put completes). The
    alarm replaces what this processing raised so far (a NaN put made the record's value undefined, UDF INVALID,
    but the refused put leaves the old, defined value), shows from this processing on and stays until the record
    processes again (its next put). Returns whether a put with completion was failed (False for a put without
    completion, which has no reply)."""
    raw = record._record
    ppn = ctypes.c_void_p.from_address(_address(record) + _offset(record._record_type_, "PPN")).value
    if ppn:
        ProcessNotify.from_address(ppn).status = NOTIFY_ERROR
    raw.UDF = 0
    raw.NSEV, raw.NSTA = severity, status
    return bool(ppn)


def show(record, value, in_progress: bool = False) -> bool:
    """Display ``value`` on output ``record`` without processing it, posting its monitors.

    Does nothing and returns False while the record is busy: processing (a put in progress), asked to process
    again (RPRO) or holding a written value not yet processed (a put without completion queued behind a busy
    record): that value must reach ``on_update`` unchanged. ``in_progress=True``: the caller knows the put in
    progress on the record has been applied already (its completion is pending): the record may then show
    ``value``, which its completion posts again."""
    addr, rtype = _address(record), record._record_type_
    _lock(addr)
    try:
        st = _state(rtype)(addr)
        if (st.PACT and not in_progress) or st.RPRO or not record._compare_values(
                record._read_value(record._record), record._value[0]):
            return False
        record.set(value, process=False)
        _post(addr, addr + _offset(rtype, "VAL"), _DBE_VALUE | _DBE_LOG)
        return True
    finally:
        _unlock(addr)
