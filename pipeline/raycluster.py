"""Connecting to (or starting) the Ray cluster a job runs on."""
from __future__ import annotations

import json
import os

import ray

_STARTED_HERE = False  # whether init_ray started or joined Ray in this process (not a caller, e.g. a test)


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`) or start a fresh local one.

    Train and Tune jobs want `dashboard=True`: Ray Train's placement-group cleanup queries the
    State API, which the dashboard serves: without it, Tune + Train V2 runs leak placement groups
    (the PlacementGroupCleaner of ray-project/ray PR #58515, fixing issue #54305, polls through
    `ray.util.state`)."""
    global _STARTED_HERE
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 configure_logging=True, logging_level="warning")
    _STARTED_HERE = True


def print_result(result: dict) -> None:
    """A job's last line: one JSON object. Ray forwards its processes' log lines to this driver
    asynchronously (a raylet's warning can arrive after the job is done), so a job that started or
    joined Ray itself disconnects first: nothing can be printed after the JSON line."""
    if _STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    print(json.dumps(result), flush=True)
