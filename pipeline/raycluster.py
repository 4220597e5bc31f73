"""Connecting to (or starting) the Ray cluster a job runs on."""
from __future__ import annotations

import json
import os
import sys

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
        # No node of a cluster on this machine can be preempted: Ray Train's preemption watcher
        # (an actor per run, whose start logs an error-level line about its arguments) has nothing
        # to watch. The cluster's processes inherit this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if "RAY_AUTH_MODE" not in os.environ:
            # Ray (2.59+) turns token authentication on for a new local cluster when RAY_AUTH_MODE
            # is unset, with a console WARNING that it did; the job makes the same choice itself.
            # Ray read its config at import: it re-reads it here, as its own switch to token does.
            os.environ["RAY_AUTH_MODE"] = "token"
            from ray._raylet import Config
            Config.initialize("")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 configure_logging=True, logging_level="warning")
    if not on_terminal():
        quiet_ray_data()
    _STARTED_HERE = True


def on_terminal() -> bool:
    """Whether this job prints to a terminal. Elsewhere (a file, CI, `ray job submit` logs) Ray's
    INFO lines — Ray Data's progress, logged as a block of lines every few seconds where no
    progress bar can be drawn, its execution plans, Ray Train's worker-group start-up and
    checkpoint reports — would bury the job's own progress lines, so jobs keep WARNING and up
    there (quiet_ray_data, `train_log_level`); a terminal keeps Ray's progress bars and INFO lines."""
    return sys.stdout.isatty()


def train_log_level() -> str:
    """Ray Train's console log level for this job (ray.train.LoggingConfig)."""
    return "INFO" if on_terminal() else "WARNING"


def quiet_ray_data(worker: bool = False) -> None:
    """This process's Ray Data logs to the console at WARNING and up (its log file, ray-data.log in
    the session folder, keeps everything): Ray Data's own logging config gives its console handler
    level INFO. In a `worker` (no terminal: Ray would forward each progress-bar frame as a line)
    progress bars are off, without Ray's reminder that they are."""
    import logging

    import ray.data  # noqa: F401 - configures the "ray.data" logger

    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler):  # the console (the session log file is not a stream)
            h.setLevel(logging.WARNING)
    if worker:
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def print_result(result: dict) -> None:
    """A job's last line: one JSON object. Ray forwards its processes' log lines to this driver
    asynchronously (a raylet's warning can arrive after the job is done), so a job that started or
    joined Ray itself disconnects first: nothing can be printed after the JSON line."""
    if _STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    print(json.dumps(result), flush=True)
