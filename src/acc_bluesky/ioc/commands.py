"""Commands that drive the twin's anomalies remotely (the IOC's ``{prefix}TWIN:CMD`` PV).

A device is named by its name in the profile (``profile.bpm_names``, ``profile.families[f].device_names``; any
case) or by family and 1-based number (``HST 5`` is index 4 of the twin, whatever the device names):

=============================================  ===========================================================
``lose_beam``                                  the beam is lost (NaN orbit, INVALID alarms, current 0)
``inject``                                     refill (clears a beam loss)
``clear``                                      remove every anomaly (stuck supplies jump to their setpoints)
``reset``                                      design setpoints, no anomaly, beam injected (errors stay)
``dead_bpm 5`` / ``dead_bpm BPMNAME``          the 5th BPM reads NaN (``... off`` to repair it)
``dead HST 5`` / ``dead DEVICE``               the corrector delivers no field, readback 0 (``... off``)
``stuck VST 10`` / ``stuck DEVICE``            the supply ignores new setpoints (``... off``)
``trip QF2``                                   the whole family's supply trips to 0 (``... off`` to reset it)
=============================================  ===========================================================

(``FAMILY:NNN``, e.g. ``HST:005``, is accepted too.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..twin import Twin

__all__ = ["Command", "CommandError", "parse_command", "apply_command", "COMMAND_HELP"]

COMMAND_HELP = ("commands: lose_beam | inject | clear | reset | dead_bpm N | dead FAMILY N | stuck FAMILY N | "
                "trip FAMILY  (N 1-based, or a device name of the profile instead of FAMILY N; append 'off' to undo)")

_SIMPLE = ("lose_beam", "inject", "clear", "reset")
_DEVICE = ("dead", "stuck")


class CommandError(ValueError):
    """A command that cannot be understood or names an unknown device; the message says what is valid."""


@dataclass(frozen=True)
class Command:
    """A parsed command: ``verb``, ``family`` (None for BPMs and simple verbs), 0-based ``index``, ``on``, and the
    ``device`` name (the BPM's or magnet's name in the profile; None for simple verbs and trips)."""

    verb: str
    family: str | None = None
    index: int | None = None
    on: bool = True
    device: str | None = None

    def describe(self) -> str:
        what = self.verb
        if self.device is not None:
            what += f" {self.device}"
        elif self.family is not None:
            what += f" {self.family}"
        return what + ("" if self.on else " off")


def _number(tok: str, n: int, what: str) -> int:
    if not tok.isdigit():
        raise CommandError(f"{what}: expected a 1-based number, got {tok!r}. {COMMAND_HELP}")
    i = int(tok)
    if not 1 <= i <= n:
        raise CommandError(f"{what}: number {i} out of range 1..{n}")
    return i - 1


def _by_name(tok: str, names: list[str]) -> int | None:
    low = tok.lower()
    for i, n in enumerate(names):
        if n.lower() == low:
            return i
    return None


def parse_command(text: str, twin: Twin) -> Command:
    """Parse and check a command against the twin's families and BPMs (raises :class:`CommandError`)."""
    toks = text.replace(",", " ").split()
    if not toks:
        raise CommandError(f"empty command. {COMMAND_HELP}")
    verb = toks[0].lower()
    args = toks[1:]
    on = True
    if args and args[-1].lower() in ("off", "on"):
        on = args.pop().lower() == "on"
    if verb in _SIMPLE:
        if args or not on:
            raise CommandError(f"{verb!r} takes no argument. {COMMAND_HELP}")
        return Command(verb)
    if verb == "dead_bpm":
        if len(args) != 1:
            raise CommandError(f"dead_bpm needs one BPM (a number or a BPM name). {COMMAND_HELP}")
        names = twin.profile.bpm_names
        i = _by_name(args[0], names)
        if i is None:
            i = _number(re.sub(r"^BPM:", "", args[0], flags=re.IGNORECASE), twin.nbpm, "dead_bpm")
        return Command(verb, None, i, on, names[i])
    if verb in _DEVICE or verb == "trip":
        if not args:
            raise CommandError(f"{verb} needs a family{' and a number' if verb != 'trip' else ''}. {COMMAND_HELP}")
        if verb in _DEVICE and len(args) == 1:
            for fname in twin.family_names:
                i = _by_name(args[0], twin.profile.families[fname].device_names)
                if i is not None:
                    return Command(verb, fname, i, on, twin.profile.families[fname].device_names[i])
        if len(args) == 1 and ":" in args[0]:
            fam, _, num = args[0].rpartition(":")
            args = [fam, num]
        fam = args[0]
        if fam not in twin.family_names:
            raise CommandError(f"{verb}: unknown family {fam!r}; valid families: {sorted(twin.family_names)}")
        if verb == "trip":
            if len(args) != 1:
                raise CommandError(f"trip takes a family only, got {' '.join(args)!r}")
            return Command(verb, fam, None, on)
        if len(args) != 2:
            raise CommandError(f"{verb} needs FAMILY N or FAMILY:NNN, got {' '.join(args)!r}")
        n = len(twin.family(fam).refpts)
        i = _number(args[1], n, f"{verb} {fam}")
        return Command(verb, fam, i, on, twin.profile.families[fam].device_names[i])
    raise CommandError(f"unknown command {verb!r}. {COMMAND_HELP}")


def apply_command(twin: Twin, cmd: Command) -> str:
    """Apply a parsed command to the twin; returns a one-line description of what was done."""
    a = twin.anomalies
    if cmd.verb == "lose_beam":
        a.lose_beam()
    elif cmd.verb == "inject":
        twin.inject()
    elif cmd.verb == "clear":
        a.clear()
    elif cmd.verb == "reset":
        twin.reset()
    elif cmd.verb == "dead_bpm":
        a.dead_bpm(cmd.index, cmd.on)
    elif cmd.verb == "dead":
        a.dead(cmd.family, cmd.index, cmd.on)
    elif cmd.verb == "stuck":
        a.stuck(cmd.family, cmd.index, cmd.on)
    elif cmd.verb == "trip":
        a.trip(cmd.family, cmd.on)
    else:  # pragma: no cover - parse_command only makes the verbs above
        raise CommandError(f"unknown command {cmd.verb!r}")
    return f"ok: {cmd.describe()}"
