"""Batch plans on bluesky-queueserver: start Redis and an RE Manager for a profile, submit and follow plans.

A physicist queues measurements and corrections; the RE Manager runs them one after the other in its own worker
process, each recorded to Tiled with FAIR metadata::

    from acc_bluesky.queue import start_queue_server, submit, run_queue

    with start_queue_server("ebs", mode="sim", seed=1) as qs:
        api = qs.api()
        uids = [submit(api, "measure_orm", {"delta": 0.2}), submit(api, "correct_orbit", {"orm": "latest"})]
        for item in run_queue(api, uids, timeout=300):
            print(item["name"], item["result"]["exit_status"], item["result"]["run_uids"])

The worker's namespace is built by :mod:`acc_bluesky.queue.startup` (``RE`` first, then the machine, then the
queue-facing plan wrappers); ``profiles/<name>/`` holds the startup file, the generated list of plans and devices
and the user-group permissions.
"""

from .client import (
    QueueError,
    SubmissionRefused,
    call_function,
    connect_api,
    format_item,
    history,
    parse_params,
    run_queue,
    start_queue,
    status,
    submit,
    wait_for_items,
)
from .manager import (
    QueueServer,
    QueueServerError,
    default_run_dir,
    gen_lists,
    load_queue_server,
    start_queue_server,
)

__all__ = [
    "QueueError",
    "QueueServer",
    "QueueServerError",
    "SubmissionRefused",
    "call_function",
    "connect_api",
    "default_run_dir",
    "format_item",
    "gen_lists",
    "history",
    "load_queue_server",
    "parse_params",
    "run_queue",
    "start_queue",
    "start_queue_server",
    "status",
    "submit",
    "wait_for_items",
]
