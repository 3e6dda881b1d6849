"""bluesky internals, in one place; ``tests/test_compat_bluesky.py`` fails loudly when they move.

``RunEngine.RunBundler`` is the class a RunEngine makes its run bundlers of (``type(self).RunBundler(...)`` at
each ``open_run``); the bundler's ``open_run`` keeps the run's descriptor composer (``_compose_descriptor``), and
each event is composed with the composer of its stream's descriptor (``ComposeDescriptorBundle.compose_event``), which validates every event against the event-model
JSON schema (~0.2-0.3 ms per event with two 448-value orbits: 1/3 of a save). :class:`TrustingRunBundler` keeps
what that validation catches for events a RunEngine composes -- the event's data and timestamps have exactly the
descriptor's keys -- and skips the schema walk (the RunEngine builds the rest itself: uid, time, seq_num,
descriptor). Descriptors, event pages and every other document are validated as before.
"""

from __future__ import annotations

from typing import Any

from bluesky.bundlers import RunBundler
from event_model import ComposeDescriptorBundle, EventModelValidationError

__all__ = ["TrustingRunBundler", "trusting_compose_event"]


def trusting_compose_event(compose_event: Any) -> Any:
    """``compose_event`` that checks the event's keys against its descriptor instead of the JSON schema."""
    keys = frozenset(k for k, v in compose_event.descriptor["data_keys"].items()
                     if v.get("external") != "STREAM:")

    def compose(data: dict, timestamps: dict, *args: Any, validate: bool = True, **kwargs: Any) -> Any:
        if validate and not (keys == data.keys() == timestamps.keys()):  # (STREAM: keys never in an event)
            raise EventModelValidationError(
                'These sets of keys must match (other than "STREAM:" keys):\n'
                f"event['data'].keys(): {data.keys()}\nevent['timestamps'].keys(): {timestamps.keys()}\n"
                f"descriptor['data_keys'].keys(): {set(keys)}\n")
        return compose_event(data, timestamps, *args, validate=False, **kwargs)

    compose.descriptor = compose_event.descriptor  # type: ignore[attr-defined]
    return compose


class TrustingRunBundler(RunBundler):
    """A bluesky ``RunBundler`` whose events skip the JSON-schema walk (see the module docs)."""

    async def open_run(self, msg: Any) -> Any:
        ret = await super().open_run(msg)
        compose_descriptor = self._compose_descriptor  # (the run's composer, set by open_run)

        def compose(*a: Any, **k: Any) -> ComposeDescriptorBundle:
            bundle = compose_descriptor(*a, **k)
            return ComposeDescriptorBundle(bundle.descriptor_doc, trusting_compose_event(bundle.compose_event),
                                           bundle.compose_event_page)

        self._compose_descriptor = compose
        return ret
