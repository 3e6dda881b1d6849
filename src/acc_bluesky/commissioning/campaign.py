"""Virtual commissioning campaigns: a sequence of the real tool plans, run per error seed on Dask workers.

Each seed runs as one Dask task (:func:`run_seed`) on a worker: its own twin (``connect(profile, mode="sim",
seed=s, error_scale=...)``), its own RunEngine (``make_run_engine``) recording to the campaign's catalogue, and the
same Bluesky plans the shell and the queue server run, in the order of the sequence
(:mod:`acc_bluesky.commissioning.sequence`). Every run carries ``campaign`` (the campaign uid), ``seed``, ``step``
(the step id) and ``campaign_attempt`` in its start document. After each step the worker records the truth the twin
knows (:mod:`acc_bluesky.commissioning.truth`) and judges the step's success criteria on it; at the end it writes
the seed's record as a run of its own (tool ``campaign_seed``: the per-step truth in its ``results`` stream with
units, the statuses and reasons in its start document). The client writes the campaign's header run (tool
``campaign``: profile, sequence, seeds), so :meth:`CampaignResult.from_catalog` reads a campaign back from the
catalogue alone, and :func:`run_campaign` with ``resume=uid`` runs only the seeds that have no record.

Failures stay in their seed: an exception of a plan or a lost beam ends that seed's chain, with the reason (a
ring that has stored no beam yet goes on while the next step needs none: threading, the sextupole ramp); a worker that dies is replaced and its seed run again by the scheduler (``distributed.scheduler.allowed-failures``),
and a seed whose task cannot finish is recorded as ``error`` with the reason (a later resume runs it again).

The catalogue is a served Tiled catalogue: a catalogue folder (default: the user's; its Tiled server on loopback
is started on demand and shared by every process of the machine, workers included) or a Tiled server's URI (a
team server, for workers on other machines).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sequence import CRITERIA, Step, default_sequence_path, load_sequence
from .truth import FIGURES, design_values, truth

__all__ = ["NO_PROFILER", "CampaignResult", "SeedResult", "StepRecord", "quiet_worker_profiler", "run_campaign",
           "run_seed", "warm_worker"]

HEADER_TOOL = "campaign"
SEED_TOOL = "campaign_seed"
_SEED_LOCK = threading.Lock()  # one seed at a time per process: pyAT's engine and the bluesky loop are global


# ============================================================================================================
# records
@dataclass
class StepRecord:
    """What one step did on one seed.

    ``status``: ``ok`` (the plan completed and met its criteria), ``missed`` (completed, a criterion not met),
    ``failed`` (the plan raised, or its run did not succeed), ``skipped`` (tool not registered), ``not run`` (the
    seed's chain had ended before).
    """

    id: str
    tool: str
    status: str
    reason: str = ""
    uid: str = ""
    seconds: float = 0.0
    truth: dict[str, float] = field(default_factory=dict)
    criteria: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recorded: bool = False  # the step's run is complete in the catalogue (its stop document is there)


@dataclass
class SeedResult:
    """One seed of a campaign: the truth before the first step, one :class:`StepRecord` per step.

    ``status``: ``done`` (the worker went through the sequence; ``reason`` says why the chain ended early, ``""``
    if it ran to the end) or ``error`` (the task did not finish: worker lost, no connection...; resumed later).
    """

    seed: int
    status: str
    reason: str = ""
    initial: dict[str, float] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    worker: str = ""
    attempt: str = ""
    attempts: int = 1
    uid: str = ""  # the seed record's run

    @property
    def success(self) -> bool:
        """Every step that ran met its criteria and the chain ran to the end."""
        return self.status == "done" and not self.reason and all(s.status in ("ok", "skipped") for s in self.steps)

    def step(self, step_id: str) -> StepRecord:
        for s in self.steps:
            if s.id == step_id:
                return s
        if self.status == "error":  # the task did not finish: no step has a record
            return StepRecord(step_id, "", "not run", self.reason)
        raise KeyError(f"seed {self.seed} has no step {step_id!r} (steps: {[s.id for s in self.steps]})")

    def final(self, figure: str) -> float:
        """The figure after the last step that ran (the initial value if none ran)."""
        for s in reversed(self.steps):
            if s.truth:
                return float(s.truth.get(figure, math.nan))
        return float(self.initial.get(figure, math.nan))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeedResult:
        d = dict(d)
        steps = [StepRecord(**{k: v for k, v in s.items() if k in StepRecord.__dataclass_fields__})
                 for s in d.pop("steps", [])]
        for s in steps:
            s.truth = _from_json_numbers(s.truth)
        d["initial"] = _from_json_numbers(d.get("initial") or {})
        return cls(steps=steps, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _json_numbers(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v))
            for k, v in d.items()}


def _from_json_numbers(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in d.items()}


def _record_json(r: SeedResult) -> dict[str, Any]:
    d = r.as_dict()
    d["initial"] = _json_numbers(r.initial)
    for s, rec in zip(d["steps"], r.steps):
        s["truth"] = _json_numbers(rec.truth)
    return d


# ============================================================================================================
# the worker side
def _emit(topic: str, msg: dict[str, Any]) -> None:
    try:
        from distributed import get_worker

        get_worker().log_event(topic, msg)
    except (ImportError, ValueError):  # not on a Dask worker
        pass


#: Dask's config that keeps a worker's sampling profiler off (see :func:`quiet_worker_profiler`).
NO_PROFILER = {"distributed.worker.profile.enabled": False}


def quiet_worker_profiler() -> bool:
    """Stop the sampling profiler of the Dask worker this runs on (True when there was one to stop).

    Dask's worker samples the stacks of its task threads every 10 ms with ``sys._current_frames()`` on its event
    loop. On CPython before 3.12 a garbage collection inside that call, while it holds the interpreter's thread
    list lock, can deadlock with a task thread in C code (CPython gh-106883): seen here as a seed hanging inside
    pyAT's tracking engine, the worker then missing its heartbeats for minutes until the scheduler restarted it.
    Campaign clusters started here have the profiler off (:data:`NO_PROFILER`); a cluster given by address (its
    workers started by ``dask worker``) has it stopped by the first seed each worker runs, before any tracking.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return False
    pcs = [worker.periodic_callbacks.get(k) for k in ("profile", "profile-cycle")]
    pcs = [pc for pc in pcs if pc is not None and pc.is_running()]
    if not pcs:
        return False
    stopped = threading.Event()

    def stop() -> None:
        for pc in pcs:
            pc.stop()
        stopped.set()

    if threading.get_ident() == getattr(worker, "thread_id", None):  # on the worker's event loop (client.run)
        stop()
        return True
    worker.loop.add_callback(stop)
    if not stopped.wait(30):
        warnings.warn("the Dask worker's profiler could not be stopped within 30 s: its event loop is busy",
                      RuntimeWarning, stacklevel=2)
    return True


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"local:{os.getpid()}"


def _resolve(step: Step, uids: dict[str, str], design: dict[str, Any], plan: Callable) -> dict[str, Any]:
    import inspect

    out: dict[str, Any] = {}
    for k, v in step.params.items():
        if isinstance(v, str) and v.startswith("$"):
            v = uids[v[1:]]
        elif v == "design" and k == "target":
            v = (tuple(round(float(q), 4) for q in design["tunes"]) if step.tool == "correct_tune"
                 else tuple(round(float(x), 2) for x in design["chrom"]))
        elif isinstance(v, list) and k == "target":
            v = tuple(v)
        out[k] = v
    if "figure_dir" in inspect.signature(plan).parameters and "figure_dir" not in out:
        out["figure_dir"] = False  # figures cost time per step; the campaign draws its own
    return out


def _judge(step: Step, t: Mapping[str, float]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for crit, limit in step.success.items():
        names, op, _, _ = CRITERIA[crit]
        vals = [t.get(n, math.nan) for n in names]
        if crit == "beam":
            out[crit] = bool(t.get("beam", 0.0) == 1.0) == bool(limit)
        elif op == "<=":
            out[crit] = all(math.isfinite(v) and v <= limit for v in vals)
        else:
            out[crit] = all(math.isfinite(v) and v >= limit for v in vals)
    return out


def _seed_record_plan(machine, rec: SeedResult, campaign: str):
    import bluesky.plan_stubs as bps

    from ..data.metadata import tool_metadata
    from ..plan_stubs.results import store_result

    md = tool_metadata(SEED_TOOL, machine, plan_name=SEED_TOOL)
    md.update(campaign=campaign, seed=int(rec.seed), step="record", campaign_status=rec.status,
              campaign_result=_record_json(rec), num_points=0)
    rows = [rec.initial] + [s.truth or {} for s in rec.steps]
    res: dict[str, Any] = {k: np.array([r.get(k, math.nan) for r in rows], dtype=float) for k in FIGURES}
    res["status_ok"] = np.array([1] + [int(s.status == "ok") for s in rec.steps])
    res["seconds"] = np.array([0.0] + [s.seconds for s in rec.steps])
    units = {k: u for k, (u, _) in FIGURES.items()} | {"status_ok": "", "seconds": "s"}
    desc = {k: f"{d}; [before the first step, after each step] (steps in the start document)"
            for k, (_, d) in FIGURES.items()}
    desc |= {"status_ok": "1 where the step met its criteria", "seconds": "wall time of each step"}
    uid = yield from bps.open_run(md=md)
    yield from store_result(res, units=units, descriptions=desc)
    yield from bps.close_run()
    return uid


def _run_engine(catalog: Mapping[str, Any], md: dict[str, Any]):
    from ..data import make_run_engine

    if catalog.get("uri"):
        return make_run_engine(tiled=catalog["uri"], api_key=catalog.get("api_key"), md=md, progress=False,
                               backup_dir=catalog.get("backup_dir"), context_managers=[])
    # no SIGINT handler: a Dask task runs in a worker thread (the campaign is stopped from the client)
    return make_run_engine(catalog_dir=catalog["dir"], md=md, progress=False, context_managers=[])


def run_seed(task: Mapping[str, Any], emit: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run the sequence on one seed (a Dask task; also callable in any process). Returns the seed's record as a
    dict (:class:`SeedResult`), after writing it to the catalogue.

    ``task``: ``campaign`` (uid), ``profile``, ``seed``, ``error_scale``, ``sequence`` (a dict), ``catalog``
    (``{"dir": folder}`` or ``{"uri": ..., "api_key": ...}``). ``emit(topic, event)``: where progress events go
    (default: the Dask worker's event log, which the campaign's client subscribes to).
    """
    from .. import connect
    from ..data.metadata import unregister_machine

    send = emit or _emit
    quiet_worker_profiler()
    with _SEED_LOCK:
        seed, uid = int(task["seed"]), str(task["campaign"])
        seq = load_sequence(task["sequence"], None)
        attempt = uuid.uuid4().hex[:12]
        topic = f"acc-campaign-{uid}"
        base = {"seed": seed, "attempt": attempt, "worker": _worker_name(), "pid": os.getpid()}
        send(topic, {**base, "event": "start"})
        t0 = time.perf_counter()
        rec = SeedResult(seed=seed, status="done", worker=base["worker"], attempt=attempt)
        from .sequence import registered_tools

        tools = registered_tools()
        machine = connect(task["profile"], mode="sim", seed=seed, error_scale=task.get("error_scale"))
        try:
            design = design_values(machine.profile)
            RE = _run_engine(task["catalog"], {"campaign": uid, "seed": seed,  # noqa: N806 - bluesky's name
                                               "campaign_attempt": attempt})
            targets: dict[str, Any] = {"tune_target": None, "chrom_target": None}
            rec.initial = truth(machine.twin, turns=seq.truth_turns, **targets)
            # at full errors a ring may store no beam before its first turns are threaded: only a beam once
            # stored can be lost
            stored = rec.initial["beam"] == 1.0
            uids: dict[str, str] = {}
            ended = ""
            for i, step in enumerate(seq.steps):
                sr = StepRecord(step.id, step.tool, "not run")
                rec.steps.append(sr)
                if step.skip:
                    sr.status, sr.reason = "skipped", step.skip
                    continue
                if ended:
                    sr.reason = f"the chain ended before: {ended}"
                    continue
                plan = tools[step.tool]
                params = _resolve(step, uids, design, plan)
                RE.md["step"] = step.id
                RE.md["step_index"] = i
                send(topic, {**base, "event": "step", "step": step.id, "index": i})
                t = time.perf_counter()
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        result = RE(plan(machine, **params))
                    sr.warnings = list(dict.fromkeys(str(w.message) for w in caught))[:5]
                    sr.uid = str(getattr(result, "plan_result", None) or result)
                    exit_status = getattr(result, "exit_status", "success")
                    if exit_status != "success":
                        raise RuntimeError(f"the run ended with exit status {exit_status!r}: "
                                           f"{getattr(result, 'reason', '')}")
                    uids[step.id] = sr.uid
                    sr.status = "ok"
                    sr.recorded = _recorded(RE, sr.uid)
                    if not sr.recorded:
                        sr.warnings.append(f"run {sr.uid} is not complete in the catalogue (no stop document)")
                except Exception as err:  # noqa: BLE001 - a failing step ends its seed, never the campaign
                    sr.status, sr.reason = "failed", f"{type(err).__name__}: {err}"
                    ended = f"step {step.id} failed ({sr.reason})"
                    if RE.state != "idle":
                        with contextlib.suppress(Exception):
                            RE.halt()
                sr.seconds = time.perf_counter() - t
                if step.tool == "correct_tune" and "target" in params:
                    targets["tune_target"] = params["target"]
                if step.tool == "correct_chromaticity" and "target" in params:
                    targets["chrom_target"] = params["target"]
                sr.truth = truth(machine.twin, turns=seq.truth_turns, **targets)
                if sr.status == "ok":
                    sr.criteria = _judge(step, sr.truth)
                    if not step.success and stored and sr.truth["beam"] != 1.0:
                        sr.criteria = {"beam": False}
                    if not all(sr.criteria.values()):
                        sr.status = "missed"
                        sr.reason = "missed " + ", ".join(
                            f"{c} ({_criterion_text(c, step.success.get(c, True), sr.truth)})"
                            for c, ok in sr.criteria.items() if not ok)
                        if step.required:
                            ended = f"step {step.id} missed a required target ({sr.reason})"
                if not ended and sr.truth["beam"] != 1.0 and (stored or not _next_beam_free(tools, seq.steps, i)):
                    ended = f"beam lost after step {step.id}: {machine.twin.loss_reason or 'no stored beam'}"
                stored = stored or sr.truth["beam"] == 1.0
                send(topic, {**base, "event": "done", "step": step.id, "index": i, "status": sr.status})
            rec.reason = ended
            rec.seconds = time.perf_counter() - t0
            RE.md["step"] = "record"
            rec.uid = str(RE(_seed_record_plan(machine, rec, uid)).plan_result)
        finally:
            unregister_machine(machine)
        send(topic, {**base, "event": "end"})
        return _record_json(rec)


def _next_beam_free(tools: dict[str, Any], steps: list[Any], i: int) -> bool:
    """True if the next step to run after step ``i`` works without a stored beam (``needs_beam=False``: the
    first-turn tools, ``ramp_sextupoles``): a ring that has stored no beam yet (no closed orbit at full errors) goes
    on to that step (threading, then the sextupole ramp that makes it store) instead of ending the seed. A beam
    once stored and then lost always ends it."""
    nxt = next((s for s in steps[i + 1:] if not s.skip), None)
    return nxt is not None and nxt.tool in tools and not getattr(tools[nxt.tool], "needs_beam", True)


def _recorded(RE, uid: str) -> bool:  # noqa: N803 - bluesky's name
    cat = getattr(RE, "catalog", None)
    if cat is None:
        return False
    try:
        return bool(cat[uid].metadata.get("stop"))
    except Exception:  # noqa: BLE001 - not there
        return False


def _criterion_text(crit: str, limit: Any, t: Mapping[str, float]) -> str:
    names, op, units, _ = CRITERIA[crit]
    if crit == "beam":
        return "no stored beam" if limit else "beam stored"
    vals = ", ".join(f"{t.get(n, math.nan):.3g}" for n in names)
    return f"{vals} {units}, wanted {op} {limit:g}".replace("  ", " ")


def warm_worker(profile: str) -> str:
    """Import the plans and parse the profile's lattice once in this process (``client.run(warm_worker, p)``)."""
    from .. import plans  # noqa: F401 - the import is the warming
    from ..twin import Twin

    quiet_worker_profiler()
    Twin(profile)
    design_values(profile)
    return profile


# ============================================================================================================
# the client side
def _catalog_spec(catalog: Any, api_key: str | None) -> dict[str, Any]:
    """``{"dir": folder}`` or ``{"uri": ..., "api_key": ...}`` for the workers."""
    from ..data.catalog import ENV_CATALOG, default_catalog_dir, is_uri

    if catalog is None:
        env = os.environ.get(ENV_CATALOG)
        catalog = env if env else default_catalog_dir()
    if isinstance(catalog, Mapping):
        return dict(catalog)
    if is_uri(os.fspath(catalog)):
        return {"uri": os.fspath(catalog), "api_key": api_key or os.environ.get("TILED_API_KEY")}
    return {"dir": str(Path(catalog).expanduser().resolve())}


def _open(spec: Mapping[str, Any]):
    from ..data import open_catalog

    if spec.get("uri"):
        return open_catalog(spec["uri"], api_key=spec.get("api_key"))
    return open_catalog(catalog_dir=spec["dir"])


def _header_plan(machine, md: dict[str, Any]):
    import bluesky.plan_stubs as bps

    from ..data.metadata import tool_metadata

    full = tool_metadata(HEADER_TOOL, machine, plan_name="run_campaign") | md
    uid = yield from bps.open_run(md=full)
    yield from bps.close_run()
    return uid


@dataclass
class _Header:
    uid: str
    profile: str
    sequence: dict[str, Any]
    seeds: list[int]
    error_scale: float | None


def _find_header(cat, uid: str) -> _Header:
    from ..data import find_runs

    runs = find_runs(cat, tool=HEADER_TOOL, campaign=uid)
    keys = list(runs)
    if not keys:
        raise KeyError(f"no campaign {uid!r} in the catalogue (no run with tool {HEADER_TOOL!r} and campaign {uid!r})")
    start = runs[keys[-1]].metadata["start"]
    return _Header(uid, str(start["campaign_profile"]), dict(start["campaign_sequence"]),
                   [int(s) for s in start["campaign_seeds"]], start.get("error_scale"))


def _seed_records(cat, uid: str) -> dict[int, SeedResult]:
    """The latest record of each seed (a ``done`` record before any ``error`` one)."""
    from ..data import find_runs

    out: dict[int, tuple[tuple[int, float], SeedResult]] = {}
    runs = find_runs(cat, tool=SEED_TOOL, campaign=uid)
    for key in list(runs):
        start = runs[key].metadata["start"]
        rec = SeedResult.from_dict(start["campaign_result"])
        rec.uid = str(start["uid"])
        rank = (int(rec.status == "done"), float(start.get("time", 0.0)))
        if rec.seed not in out or rank > out[rec.seed][0]:
            out[rec.seed] = (rank, rec)
    return {s: r for s, (_, r) in sorted(out.items())}


class _Progress:
    """A tqdm bar over seeds x steps, fed by the workers' events (and the client's view of finished seeds)."""

    def __init__(self, total_steps: int, n_seeds: int, enabled: bool, on_event: Callable | None):
        self.on_event = on_event
        self.lock = threading.Lock()
        self.per_seed = total_steps
        self.counted: dict[int, int] = {}
        self.attempts: dict[int, set[str]] = {}
        self.workers: dict[int, str] = {}
        self.seeds_done = 0
        self.n_seeds = n_seeds
        self.bar = None
        if enabled and n_seeds:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps * n_seeds, unit="step", desc="campaign", dynamic_ncols=True)

    def event(self, msg: Mapping[str, Any]) -> None:
        with self.lock:
            seed = int(msg.get("seed", -1))
            if msg.get("attempt"):
                self.attempts.setdefault(seed, set()).add(str(msg["attempt"]))
            if msg.get("worker"):
                self.workers[seed] = str(msg["worker"])
            if msg.get("event") == "done":
                self._advance(seed, int(msg.get("index", 0)) + 1 - self.counted.get(seed, 0), msg)
        if self.on_event is not None:
            self.on_event(dict(msg))

    def _advance(self, seed: int, n: int, msg: Mapping[str, Any] | None = None) -> None:
        n = max(0, min(n, self.per_seed - self.counted.get(seed, 0)))
        self.counted[seed] = self.counted.get(seed, 0) + n
        if self.bar is not None and n:
            self.bar.update(n)
            if msg:
                self.bar.set_postfix_str(f"seeds {self.seeds_done}/{self.n_seeds}, seed {seed}: {msg.get('step')} "
                                         f"{msg.get('status', '')}")

    def seed_done(self, seed: int) -> None:
        with self.lock:
            self.seeds_done += 1
            self._advance(seed, self.per_seed)
            if self.bar is not None:
                self.bar.set_postfix_str(f"seeds {self.seeds_done}/{self.n_seeds}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _client(address: str | None, client, n_workers: int):
    from distributed import Client, LocalCluster

    if client is not None:
        return client, None, False
    if address is not None:
        return Client(address), None, True
    import dask

    with dask.config.set(NO_PROFILER):  # the workers take the config they are started with
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               host="127.0.0.1")
    return Client(cluster), cluster, True


def run_campaign(profile: str | None = None, seeds: Iterable[int] | None = None, sequence: Any = None, *,
                 error_scale: float | None = None, n_workers: int = 2, address: str | None = None, client=None,
                 catalog: Any = None, api_key: str | None = None, resume: str | None = None,
                 progress: bool = True, on_event: Callable[[dict], None] | None = None,
                 stop: threading.Event | None = None, local: bool = False) -> CampaignResult:
    """Run (or resume) a commissioning campaign; returns its :class:`CampaignResult` as read back from the
    catalogue.

    Args:
        profile: profile name or path (a resumed campaign's own by default).
        seeds: error seeds (a resumed campaign's own by default).
        sequence: a sequence file, YAML text, dict or :class:`CampaignSequence`; default the profile's
            ``sequence.yaml``. Validated before any worker starts (:class:`~.sequence.SequenceError`).
        error_scale: multiplier on the profile's alignment errors (default: the sequence's, else the profile's).
        n_workers: worker processes of the ``LocalCluster`` started when neither ``address`` nor ``client`` is given.
        address: scheduler address of a running Dask cluster (``tcp://host:8786``).
        client: an open ``distributed.Client`` (kept open).
        catalog: a catalogue folder or a Tiled URI; default ``$ACC_BLUESKY_CATALOG``, else the user's folder.
        api_key: the Tiled server's key (with a URI); default ``$TILED_API_KEY``.
        resume: uid of an interrupted campaign: runs only its seeds that have no ``done`` record.
        progress: a progress bar over seeds and steps.
        on_event: called with each worker event (``{"event": start|step|done|end, "seed", "step", "worker", "pid",
            "attempt", ...}``), in a client thread.
        stop: set it (from any thread) to interrupt the campaign as Ctrl-C does: the seeds not started are left
            for a resume, the running ones finish.
        local: run the seeds one after the other in this process (no Dask; for debugging).

    Returns:
        the campaign read back from the catalogue; ``result.ran`` lists the seeds this call ran, ``result.missing``
        the seeds left without a record (resume them).
    """
    from ..profile import load_profile

    spec = _catalog_spec(catalog, api_key)
    cat = _open(spec)
    if resume is not None:
        head = _find_header(cat, resume)
        uid = head.uid
        profile = profile or head.profile
        seq = load_sequence(sequence if sequence is not None else head.sequence, profile)
        seeds = list(seeds) if seeds is not None else head.seeds
        error_scale = error_scale if error_scale is not None else head.error_scale
    else:
        if profile is None or seeds is None:
            raise ValueError("run_campaign needs a profile and seeds (or resume=uid)")
        seq = load_sequence(sequence if sequence is not None else default_sequence_path(profile), profile)
        uid = str(uuid.uuid4())
        if error_scale is None:
            error_scale = seq.error_scale
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    prof = load_profile(profile)
    done = {s for s, r in _seed_records(cat, uid).items() if r.status == "done"} if resume else set()
    todo = [s for s in seeds if s not in done]
    if resume is None:
        from types import SimpleNamespace

        RE = _run_engine(spec, {})  # noqa: N806 - bluesky's name
        RE(_header_plan(SimpleNamespace(profile=prof, mode="sim", seed=None), {
            "campaign": uid, "campaign_profile": str(profile), "campaign_sequence": seq.as_dict(),
            "campaign_seeds": seeds, "error_scale": error_scale, "step": "header",
            "campaign_skipped": {s.id: s.skip for s in seq.skipped}}))
    task_profile = str(profile) if not Path(str(profile)).exists() else str(Path(str(profile)).resolve())
    tasks = {s: {"campaign": uid, "profile": task_profile, "seed": s, "error_scale": error_scale,
                 "sequence": seq.as_dict(), "catalog": spec} for s in todo}
    bar = _Progress(len(seq.steps), len(todo), progress, on_event)
    errors: dict[int, str] = {}
    try:
        if local:
            for s in todo:
                try:
                    run_seed(tasks[s], emit=lambda _topic, msg: bar.event(msg))
                except Exception as err:  # noqa: BLE001 - one seed never ends the campaign
                    errors[s] = f"{type(err).__name__}: {err}"
                bar.seed_done(s)
        elif todo:
            errors = _run_on_dask(tasks, uid, bar, address, client, n_workers, stop)
    finally:
        bar.close()
    if errors:
        _record_errors(spec, prof, uid, errors, bar)
    result = CampaignResult.from_catalog(uid, catalog=cat, seeds=seeds, attempts={
        s: len(a) for s, a in bar.attempts.items()})
    result.ran = sorted(bar.attempts)
    return result


def _run_on_dask(tasks: dict[int, dict], uid: str, bar: _Progress, address, client, n_workers,
                 stop: threading.Event | None) -> dict[int, str]:
    """One task per seed, as many in flight as the cluster has worker threads (the next seed is submitted when one
    ends). A set ``stop`` (or Ctrl-C) is a graceful interruption: no seed is submitted any more (a resume runs them),
    the seeds running finish and are recorded; a second Ctrl-C leaves them."""
    from distributed import wait

    client, cluster, own = _client(address, client, n_workers)
    topic = f"acc-campaign-{uid}"
    errors: dict[int, str] = {}
    futures: dict[Any, int] = {}
    queue = list(tasks)
    token = uuid.uuid4().hex[:6]

    def collect(fut) -> None:
        s = futures[fut]
        if fut.status == "error":
            err = fut.exception()
            errors[s] = (f"{type(err).__name__}: {err}" + (
                " (the worker running this seed died each time it was tried)"
                if type(err).__name__ == "KilledWorker" else ""))
        bar.seed_done(s)

    def submit(pending: set) -> None:
        slots = max(1, sum(client.nthreads().values()))
        while queue and len(pending) < slots:
            s = queue.pop(0)
            fut = client.submit(run_seed, tasks[s], key=f"acc-campaign-{uid[:8]}-{token}-seed-{s}", pure=False)
            futures[fut] = s
            pending.add(fut)

    try:
        client.subscribe_topic(topic, lambda event: bar.event(event[1]))
        pending: set = set()
        submit(pending)
        interrupted = False
        while pending:
            try:
                try:
                    done, rest = wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
                    pending = set(rest)
                except TimeoutError:  # nothing finished within the timeout: look at stop again
                    done = set()
                for fut in done:
                    collect(fut)
                if stop is not None and stop.is_set() and not interrupted:
                    raise KeyboardInterrupt
                if not interrupted:
                    submit(pending)
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: leave the running seeds (their records come when they end)
                    raise
                interrupted = True
                queue.clear()
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)
        for fut in futures:  # nothing kept on the cluster: a lost worker recomputes nothing of a finished campaign
            fut.release()
        if own:
            client.close()
        if cluster is not None:
            cluster.close()
    return errors


def _record_errors(spec, prof, uid: str, errors: dict[int, str], bar: _Progress) -> None:
    """Seeds whose task did not finish: an ``error`` record each (written by the client)."""
    from types import SimpleNamespace

    RE = _run_engine(spec, {})  # noqa: N806 - bluesky's name
    for s, why in errors.items():
        rec = SeedResult(seed=s, status="error", reason=why, worker=bar.workers.get(s, ""),
                         attempts=len(bar.attempts.get(s, ())) or 1)
        RE(_seed_record_plan(SimpleNamespace(profile=prof, mode="sim", seed=s), rec, uid))


# ============================================================================================================
# the campaign, read back
#: Figures of the summary plots: (truth keys, label, scale to the unit shown, unit shown).
_PLOTS = {
    "orbit_rms": (("orbit_rms_x", "orbit_rms_y"), "rms orbit (truth)", 1e6, "um"),
    "beta_beat": (("beta_beat_x", "beta_beat_y"), "beta-beating rms", 100.0, "%"),
    "tune_error": (("tune_error",), "tune error |dQ|", 1.0, "(tune units)"),
    "chrom_error": (("chrom_error",), "chromaticity error |dxi|", 1.0, "(1)"),
    "transmission": (("transmission",), "transmission", 100.0, "%"),
}


@dataclass
class CampaignResult:
    """A campaign as the catalogue holds it: its header and one :class:`SeedResult` per seed."""

    uid: str
    profile: str
    sequence: dict[str, Any]
    seeds: list[int]
    results: dict[int, SeedResult]
    error_scale: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    ran: list[int] = field(default_factory=list)  # seeds the call that returned this ran (not read back)

    @classmethod
    def from_catalog(cls, uid: str, catalog: Any = None, *, seeds: Iterable[int] | None = None,
                     attempts: Mapping[int, int] | None = None) -> CampaignResult:
        """Read campaign ``uid`` back from ``catalog`` (a Tiled client, a folder or a URI; default the user's)."""
        cat = catalog if hasattr(catalog, "search") else _open(_catalog_spec(catalog, None))
        head = _find_header(cat, uid)
        recs = _seed_records(cat, uid)
        for s, n in (attempts or {}).items():
            if s in recs and n > recs[s].attempts:
                recs[s].attempts = n
        seq = head.sequence
        skipped = {}
        for st in seq.get("steps", []):
            with contextlib.suppress(Exception):
                one = load_sequence({"steps": [st]})
                if one.steps[0].skip:
                    skipped[str(st.get("id"))] = one.steps[0].skip
        return cls(uid, head.profile, seq, list(seeds) if seeds is not None else head.seeds, recs,
                   head.error_scale, skipped)

    # ---- statistics ------------------------------------------------------------------------------------
    @property
    def step_ids(self) -> list[str]:
        return [str(s.get("id")) for s in self.sequence.get("steps", [])]

    @property
    def missing(self) -> list[int]:
        """Seeds with no ``done`` record (run them with ``run_campaign(resume=uid)``)."""
        return [s for s in self.seeds if s not in self.results or self.results[s].status != "done"]

    def counts(self, step_id: str) -> dict[str, int]:
        out = {"ok": 0, "missed": 0, "failed": 0, "not run": 0, "skipped": 0, "error": 0}
        for s in self.seeds:
            r = self.results.get(s)
            if r is None or r.status == "error":
                out["error"] += 1
                continue
            out[r.step(step_id).status] += 1
        return out

    def success_rate(self, step_id: str) -> float:
        """Fraction of the campaign's seeds on which the step met its criteria (NaN for a skipped step)."""
        c = self.counts(step_id)
        if c["skipped"] == len(self.seeds):
            return math.nan
        return c["ok"] / len(self.seeds) if self.seeds else math.nan

    def figure(self, name: str, step_id: str | None = None) -> np.ndarray:
        """Truth figure ``name`` per seed (campaign order) after step ``step_id`` (``None``: after the last step
        that ran; ``"initial"``: before the first); NaN where it does not exist."""
        out = []
        for s in self.seeds:
            r = self.results.get(s)
            if r is None:
                out.append(math.nan)
            elif step_id == "initial":
                out.append(r.initial.get(name, math.nan))
            elif step_id is None:
                out.append(r.final(name))
            else:
                out.append(r.step(step_id).truth.get(name, math.nan))
        return np.asarray(out, dtype=float)

    def table(self) -> str:
        """Success rate per step, with the median truth after it."""
        n = len(self.seeds)
        lines = [f"campaign {self.uid} on {self.profile}: {n} seed(s), error scale "
                 f"{'profile default' if self.error_scale is None else self.error_scale}",
                 f"{'step':24s} {'tool':22s} {'ok':>7s} {'missed':>6s} {'failed':>6s} {'not run':>7s}  "
                 f"{'median after: orbit x/y [um]':>28s} {'beta-beat x/y [%]':>17s} {'|dQ|':>8s} {'|dxi|':>6s}"]
        for st in self.sequence.get("steps", []):
            sid = str(st["id"])
            tool = next(k for k in st if k not in ("id", "success", "required", "note"))
            c = self.counts(sid)
            if c["skipped"] == n and n:
                lines.append(f"{sid:24s} {tool:22s}   skipped: {self.skipped.get(sid, 'tool not registered')}")
                continue

            def med(k: str, scale: float, sid: str = sid) -> str:
                v = self.figure(k, sid) * scale
                v = v[np.isfinite(v)]
                return f"{np.median(v):.3g}" if v.size else "-"

            lines.append(f"{sid:24s} {tool:22s} {c['ok']:3d}/{n:<3d} {c['missed']:6d} {c['failed'] + c['error']:6d} "
                         f"{c['not run']:7d}  {med('orbit_rms_x', 1e6) + ' / ' + med('orbit_rms_y', 1e6):>28s} "
                         f"{med('beta_beat_x', 100) + ' / ' + med('beta_beat_y', 100):>17s} "
                         f"{med('tune_error', 1):>8s} {med('chrom_error', 1):>6s}")
        ok = sum(1 for s in self.seeds if s in self.results and self.results[s].success)
        lines.append(f"whole chain: {ok}/{n} seed(s) met every target")
        for s in self.seeds:
            r = self.results.get(s)
            if r is None:
                lines.append(f"  seed {s}: no record (resume the campaign to run it)")
            elif r.reason:
                lines.append(f"  seed {s}: {r.status}: {r.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """PNG per figure: the histogram over seeds after the last step that ran, and the CDF after each step
        (one line per step that changes it). Returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        steps = ["initial"] + [s for s in self.step_ids if self.counts(s)["skipped"] < len(self.seeds)]
        for key, (names, label, scale, unit) in _PLOTS.items():
            per_step = {sid: np.concatenate([self.figure(n, sid) for n in names]) * scale for sid in steps}
            if not any(np.isfinite(v).any() for v in per_step.values()):
                continue
            final = np.concatenate([self.figure(n) for n in names]) * scale
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
            for n in names:
                v = self.figure(n) * scale
                v = v[np.isfinite(v)]
                if v.size:
                    ax1.hist(v, bins=max(5, min(30, v.size)), alpha=0.6, label=n.replace("_", " "))
            ax1.set_xlabel(f"{label} [{unit}]" if not unit.startswith("(") else f"{label} {unit}")
            ax1.set_ylabel("seeds")
            ax1.set_title(f"after the last step that ran ({np.isfinite(final).sum()} values)")
            ax1.legend(fontsize=8)
            last = None
            for sid, v in per_step.items():
                v = np.sort(v[np.isfinite(v)])
                if not v.size or (last is not None and np.array_equal(v, last)):
                    continue
                last = v
                ax2.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=sid)
            ax2.set_xlabel(ax1.get_xlabel())
            ax2.set_ylabel("fraction of values <= x")
            ax2.set_title("CDF after each step")
            ax2.legend(fontsize=7)
            for ax in (ax1, ax2):
                ax.grid(alpha=0.3)
            fig.suptitle(f"campaign {self.uid[:8]} on {self.profile}: {label} over {len(self.seeds)} seed(s)")
            fig.tight_layout()
            path = out / f"campaign_{self.uid[:8]}_{key}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths
