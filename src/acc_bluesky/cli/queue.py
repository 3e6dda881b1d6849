"""``acc-bluesky queue ...``: run batch plans on a bluesky-queueserver RE Manager.

``queue start PROFILE`` starts Redis and the RE Manager on loopback and opens the worker environment (the machine
and RE built from ``profiles/PROFILE/startup.py``); ``queue submit`` / ``status`` / ``plans`` / ``stop`` talk to
it; ``queue gen-lists PROFILE`` regenerates the profile's ``existing_plans_and_devices.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["add_parser"]


def _server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which queue server")
    g.add_argument("--profile", default="ebs", help="profile whose server to use (default: ebs)")
    g.add_argument("--run-dir", default=None, help="run folder of the server (default: per profile, "
                                                   "$ACC_BLUESKY_QUEUE_DIR/PROFILE or ~/.local/state/...)")
    g.add_argument("--zmq-control-addr", default=None,
                   help="talk to this RE Manager directly (e.g. tcp://127.0.0.1:60615) instead of a server "
                        "started by `queue start`")


def add_parser(sub) -> None:
    p = sub.add_parser("queue", help="batch plans on a bluesky-queueserver RE Manager (start, submit, status)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    s = qsub.add_parser("start", help="start Redis + RE Manager on 127.0.0.1 and open the environment")
    s.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default: ebs)")
    s.add_argument("--mode", choices=("sim", "epics", "tango"), default="sim",
                   help="sim twin, live EPICS or Tango devices (default sim)")
    s.add_argument("--seed", type=int, default=1, help="sim error seed (default 1; -1 = ideal machine)")
    s.add_argument("--prefix", default=None, help="epics mode: PV prefix (default: the profile's controls.prefix)")
    s.add_argument("--address", default=None,  # tango
                   help="tango mode: HOST:PORT of the device server (acc-bluesky tango-server); default $TANGO_HOST")
    s.add_argument("--redis-port", type=int, default=None, help="Redis port (default: a free port)")
    s.add_argument("--zmq-port", type=int, default=None, help="RE Manager control port (default: a free port)")
    s.add_argument("--zmq-info-port", type=int, default=None, help="RE Manager info port (default: a free port)")
    s.add_argument("--catalog-dir", default=None, help="embedded Tiled catalogue for the runs "
                                                       "(default: the data layer's default folder)")
    s.add_argument("--tiled", default=None, help="Tiled server URI instead of the embedded catalogue "
                                                 "(API key from $TILED_API_KEY)")
    s.add_argument("--run-dir", default=None, help="folder for logs and the server state")
    s.add_argument("--no-open", action="store_true", help="do not open the worker environment")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground; Ctrl-C stops the server")
    s.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per start stage (default 180)")
    s.set_defaults(func=_start)

    s = qsub.add_parser("stop", help="stop the RE Manager and Redis")
    _server_args(s)
    s.set_defaults(func=_stop)

    s = qsub.add_parser("submit", help="add a plan to the queue (validated by the manager before it is queued)")
    s.add_argument("plan", help="plan name, e.g. measure_orm")
    s.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="plan keyword argument, YAML value: -p delta=0.2 -p 'correctors=[HST_001, HST_002]'")
    s.add_argument("--user", default=None, help="user name recorded with the item")
    s.add_argument("--group", default=None, help="user group: primary (default), admin, operator, guest")
    s.add_argument("--front", action="store_true", help="put the plan at the front of the queue")
    s.add_argument("--start", action="store_true", help="start the queue after adding the plan")
    s.add_argument("--wait", action="store_true", help="start the queue and wait for this plan; exit 1 if it fails")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait (default 3600)")
    _server_args(s)
    s.set_defaults(func=_submit)

    s = qsub.add_parser("status", help="manager state, queue, running item and recent history")
    s.add_argument("--history", type=int, default=10, help="how many history items to show (default 10)")
    s.add_argument("--json", action="store_true", help="print the raw status as JSON")
    _server_args(s)
    s.set_defaults(func=_status)

    s = qsub.add_parser("plans", help="plans a group may submit, with their parameters")
    s.add_argument("--group", default=None, help="user group (default primary)")
    _server_args(s)
    s.set_defaults(func=_plans)

    s = qsub.add_parser("gen-lists", help="regenerate PROFILE/existing_plans_and_devices.yaml from its startup")
    s.add_argument("profile", nargs="?", default="ebs", help="profile name or path (default: ebs)")
    s.add_argument("--out", default=None, help="output folder (default: the profile folder)")
    s.add_argument("--mode", choices=("sim", "epics"), default="sim", help="mode used to list (default sim)")
    s.add_argument("--seed", type=int, default=1, help="sim error seed used to list (default 1)")
    s.add_argument("--catalog-dir", default=None,
                   help="catalogue folder the startup's RunEngine opens while listing (default: a temporary one; "
                        "a folder whose server is running saves starting one)")
    s.set_defaults(func=_gen_lists)


def _seed(v: int) -> int | None:
    return None if v < 0 else v


def _api(args: argparse.Namespace):
    from ..queue import connect_api, load_queue_server

    if args.zmq_control_addr:
        return connect_api(args.zmq_control_addr)
    return load_queue_server(args.run_dir, profile=args.profile).api()


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 1


def _start(args: argparse.Namespace) -> int:
    from ..queue import QueueServerError, start_queue_server

    t0 = time.perf_counter()
    try:
        qs = start_queue_server(args.profile, mode=args.mode, seed=_seed(args.seed), redis_port=args.redis_port,
                                zmq_control_port=args.zmq_port, zmq_info_port=args.zmq_info_port,
                                catalog_dir=args.catalog_dir, tiled=args.tiled, run_dir=args.run_dir,
                                open_env=not args.no_open, timeout=args.timeout, prefix=args.prefix,
                                address=args.address)
    except (QueueServerError, ValueError) as err:
        return _fail(err)
    print(f"queue server for {qs.profile!r} ({qs.mode}, seed {qs.seed}) ready in {time.perf_counter() - t0:.1f} s")
    print(f"  control  {qs.zmq_control_addr}\n  info     {qs.zmq_info_addr}\n  redis    127.0.0.1:{qs.redis_port} "
          f"(prefix {qs.redis_prefix})\n  logs     {qs.manager_log}\n  catalog  {qs.catalog_dir or qs.tiled or 'default'}")
    rd = f" --run-dir {qs.run_dir}" if args.run_dir else ""
    print(f"submit with `acc-bluesky queue submit measure_orm -p delta=0.2 --start{rd}`; "
          f"stop with `acc-bluesky queue stop{rd}`")
    if args.foreground:
        try:
            while qs.is_running():
                time.sleep(1.0)
            print("the queue server exited; see " + str(qs.manager_log), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            qs.stop()
            print("stopped")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from ..queue import QueueServerError, load_queue_server

    try:
        qs = load_queue_server(args.run_dir, profile=args.profile)
    except QueueServerError as err:
        return _fail(err)
    qs.stop()
    print(f"stopped the queue server of {qs.profile!r} (manager pid {qs.manager_pid}, redis pid {qs.redis_pid})")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ..queue import QueueError, QueueServerError, format_item, parse_params, run_queue, start_queue, submit

    try:
        kwargs = parse_params(args.param)
        api = _api(args)
    except (ValueError, QueueServerError) as err:
        return _fail(err)
    try:
        uid = submit(api, args.plan, kwargs, user=args.user, group=args.group, pos="front" if args.front else None)
        print(f"queued {args.plan} as item {uid}")
        if args.wait:
            (item,) = run_queue(api, [uid], timeout=args.timeout)
            if item is None:
                print("the queue stopped before this plan ran (an earlier item failed or the queue was paused); "
                      "see `acc-bluesky queue status`", file=sys.stderr)
                return 1
            print(format_item(item))
            return 0 if item["result"]["exit_status"] == "completed" else 1
        if args.start:
            start_queue(api)
            print("queue started")
    except QueueError as err:
        return _fail(err)
    finally:
        api.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..queue import QueueError, QueueServerError, format_item, history, status

    try:
        api = _api(args)
    except QueueServerError as err:
        return _fail(err)
    try:
        st = status(api)
        if args.json:
            print(json.dumps(st, indent=2, default=str))
            return 0
        queue = api.queue_get(reload=True)
        hist = history(api)
    except QueueError as err:
        return _fail(err)
    finally:
        api.close()
    print(f"manager {st['manager_state']}, environment {'open' if st['worker_environment_exists'] else 'closed'}, "
          f"RE {st['re_state']}, {st['items_in_queue']} queued, {st['items_in_history']} in history")
    if queue.get("running_item"):
        print("running: " + format_item(queue["running_item"]))
    for i, item in enumerate(queue["items"]):
        print(f"  {i:2d}. {format_item(item)}")
    if hist and args.history > 0:
        print("history (latest last):")
        for item in hist[-args.history:]:
            print("  " + format_item(item).replace("\n", "\n  "))
    return 0


def _plans(args: argparse.Namespace) -> int:
    from ..queue import QueueServerError

    try:
        api = _api(args)
    except QueueServerError as err:
        return _fail(err)
    try:
        plans = api.plans_allowed(user_group=args.group)["plans_allowed"]
    except Exception as err:  # noqa: BLE001
        return _fail(err)
    finally:
        api.close()
    for name in sorted(plans):
        p = plans[name]
        print(f"{name}: {(p.get('description') or '').strip().splitlines()[0] if p.get('description') else ''}")
        for par in p.get("parameters", []):
            ann = par.get("annotation", {}).get("type", "")
            for key in ("enums", "devices"):
                for tname, values in par.get("annotation", {}).get(key, {}).items():
                    shown = ", ".join(values[:6]) + (f", ... ({len(values)})" if len(values) > 6 else "")
                    ann = ann.replace(tname, "{" + shown + "}")
            default = f" = {par['default']}" if "default" in par else ""
            desc = (par.get("description") or "").strip().splitlines()
            print(f"    {par['name']}: {ann}{default}" + (f"  -- {desc[0]}" if desc else ""))
    return 0


def _gen_lists(args: argparse.Namespace) -> int:
    from ..queue import QueueServerError, gen_lists

    t0 = time.perf_counter()
    try:
        path = gen_lists(args.profile, out_dir=args.out, mode=args.mode, seed=_seed(args.seed),
                         catalog_dir=args.catalog_dir)
    except QueueServerError as err:
        return _fail(err)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0
