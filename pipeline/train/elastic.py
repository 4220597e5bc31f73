"""What keeps a run going on a cluster whose nodes come and go: each training worker's Ray Data
readers run on its own CPUs (never waiting for a free one), a read that gets no CPU fails within a
minute instead of hanging, and a lost node restarts the run without counting as a failure.

Why the readers share the worker's CPUs (Ray 2.60, checked on a head + two 1-CPU nodes):
- Ray Train V2 runs each worker in a placement-group bundle of `resources_per_worker` and gives the
  worker actor that whole bundle (worker_group._create_workers: `bundle_to_remote_args(
  resources_per_worker)`), so a bundle never has CPU left for tasks: a reader CPU added to it would
  be held by the worker, and a 1-CPU node could no longer host a worker at all.
- Tasks that a worker starts run outside its bundle; they wait for a CPU no bundle holds. Once an
  elastic restart puts a worker on every CPU (one on the head), Ray Data logs "Cluster resources are
  not enough to run any task … may hang forever" and every read hangs.
- A cap on workers that leaves CPUs free holds only while nothing else takes them, and Ray Train
  sizes an elastic group by what it can place, not by what its readers need.
So the read tasks ask for 0 CPUs, are pinned to the worker's node (its `ray.io/node-id` label) and
are at most as many at once as the worker's share of that node's cores (cores ÷ training workers on
the node, at least its train.cpus_per_worker): on a CPU node they share the cores with training, as
the worker's torch threads do; on a GPU node, where a worker holds one CPU and the rest are idle,
they use that node's idle cores (a 224-px image view costs ~2–3 ms of a core: benchmarks/README,
"image_views", ~8 cores per GPU). They can always run, with or without `train.worker_resources`,
and Ray Data's starvation check sees tasks that need nothing. (`label_selector` and `compute` are named map_batches arguments; a
PlacementGroupSchedulingStrategy into the bundle would need the `**ray_remote_args` that Ray 2.60
deprecates, and puts 0-CPU tasks on the same node.) Where no placement group holds the reader (a
driver), reads keep Ray Data's defaults: 1 CPU per task from the free ones, and the watchdog.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

NODE_LABEL = "ray.io/node-id"  # every Ray node's own label (ray._raylet.RAY_NODE_ID_KEY)
READ_STARVED_S = 45.0  # a read whose first block waits this long with no CPU free for it fails
_POLL_S = 1.0


class ReadersStarved(RuntimeError):
    """Ray Data read tasks cannot get the CPUs they need: a configuration error, not retried."""


def reader_options(tasks: int | None = None) -> dict:
    """Ray Data map_batches arguments of this process's read tasks: inside a Ray Train worker (a
    placement group holds it), 0 CPUs on its own node, as many at once as its share of the node's
    cores; elsewhere Ray Data's 1 CPU each, as many at once as the cluster has CPUs. Never more at
    once than the read has `tasks` (Ray Data warns on the console otherwise)."""
    import os

    import ray
    import ray.data

    if ray.util.get_current_placement_group() is None:
        # At most as many at once as the cluster has CPUs: with preserve_order the first block
        # comes from the first task, which 32 submitted at once may leave queued (a 1 M-row epoch's
        # first block: 2.3 s unbounded, 0.6 s bounded to 2 CPUs, measured here).
        size = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return {"compute": ray.data.TaskPoolStrategy(size=min(size, tasks or size))}
    ctx = ray.get_runtime_context()
    held = int(ctx.get_assigned_resources().get("CPU", 1.0))
    try:
        import ray.train

        here = ray.train.get_context().get_local_world_size()  # training workers on this node
    except Exception:  # not a Ray Train worker
        here = 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = max(1, held, cores // max(1, here))
    return {"num_cpus": 0, "label_selector": {NODE_LABEL: ctx.get_node_id()},
            "compute": ray.data.TaskPoolStrategy(size=min(size, tasks or size))}


def watch_first_block(batches: Iterator, starved_s: float | None = None) -> Iterator:
    """`batches` (a Ray Data iterator) passed through; while its first block has not arrived, the
    cluster's free CPUs are checked every second, and ReadersStarved is raised once the read tasks
    could not have had one for `starved_s` seconds (READ_STARVED_S): an error naming the fix, not a
    hang. Reads that need no CPU (reader_options inside a worker) are never starved; a slow first
    block with CPUs free is waited for."""
    import ray

    batches = iter(batches)
    need = reader_options().get("num_cpus", 1.0)
    if need <= 0:
        yield from batches
        return
    limit = READ_STARVED_S if starved_s is None else starved_s
    first: list = []
    lock, done, abandoned = threading.Lock(), threading.Event(), threading.Event()

    def pull() -> None:
        try:
            first.append((True, next(batches)))
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the reader
            first.append((False, e))
        finally:
            with lock:
                done.set()
                gave_up = abandoned.is_set()
            if gave_up:  # the reader gave up on this read: end it now that it can be ended
                getattr(batches, "close", lambda: None)()

    threading.Thread(target=pull, daemon=True, name="first-block").start()
    starved = 0.0
    while not done.wait(_POLL_S):
        free = ray.available_resources().get("CPU", 0.0)
        starved = starved + _POLL_S if free < need else 0.0
        if starved >= limit:
            with lock:
                if not done.is_set():
                    abandoned.set()
            if abandoned.is_set():
                total = ray.cluster_resources().get("CPU", 0.0)
                raise ReadersStarved(
                    f"Ray Data reads got no CPU for {starved:.0f} s: all {total:g} CPUs of the cluster are held "
                    f"(by training workers or other jobs) and each read task needs {need:g}. Leave CPUs free "
                    f"for them (fewer workers, a lower train.cpus_per_worker, or a train.worker_resources "
                    f"resource that keeps workers off some nodes) or add CPUs to the cluster")
    if not first:
        return
    ok, item = first[0]
    if not ok:
        raise item
    yield item
    yield from batches


# ----------------------------------------------------------------------------- failures
# What a worker whose peer vanished fails with: gloo/NCCL on a closed connection or a collective
# timeout, Ray when its poll reaches a dead actor before the GCS has declared the node dead.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "DistBackendError",
             "DistNetworkError", "NCCL", "gloo", "Socket Timeout", "timed out", "ActorUnavailableError",
             "WorkerHealthCheckTimeoutError")


def _unwrap(error: BaseException) -> BaseException:
    """A worker's failure as raised: Ray Train wraps a health check's error and a user exception."""
    error = getattr(error, "health_check_failure", error)  # WorkerHealthCheckFailedError
    return getattr(error, "_base_exc", error)  # UserExceptionWithTraceback


def node_lost(error: BaseException) -> bool:
    """Whether a worker died with its node (a spot node reclaimed, a machine gone): Ray's
    ActorDiedError says "The actor died because its node has died" (GCS) or, for a drained spot
    node, sets `preempted`."""
    from ray.exceptions import RayActorError

    e = _unwrap(error)
    return isinstance(e, RayActorError) and (e.preempted or "because its node has died" in str(e))


def peer_lost(error: BaseException) -> bool:
    """Whether a failure is what a worker sees when another worker's node vanished."""
    e = _unwrap(error)
    return any(m in f"{type(error).__name__} {type(e).__name__}: {e}" for m in PEER_LOST)


def readers_starved(error: BaseException) -> bool:
    return isinstance(_unwrap(error), ReadersStarved) or "ReadersStarved: " in str(error)


def node_death_wait_s() -> float:
    """How long the GCS may take to declare a vanished node dead: its health checks (Ray's
    RAY_health_check_* settings, read by the GCS at its start; defaults 3 s × 5 misses, a 10 s
    timeout), plus a margin."""
    import os

    def ms(name: str, default: float) -> float:
        return float(os.environ.get(f"RAY_health_check_{name}", default))

    return (ms("period_ms", 3000) * ms("failure_threshold", 5) + ms("timeout_ms", 10000)) / 1000 + 5


def dead_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}


class NodeLossPolicy:
    """Ray Train's failure policy with two changes:
    - a failure in which a worker died with its node is retried without counting against
      FailureConfig.max_failures (which counts failures of the training code), up to
      FailureConfig.max_preemption_failures (-1: always). Ray 2.60 counts only nodes drained for
      preemption (RayActorError.preempted, set for AUTOSCALER_DRAIN_PREEMPTED) that way; a node
      that just dies is a WorkerGroupError charged to max_failures. A lost node shows as the dead
      worker's ActorDiedError ("its node has died") once the GCS has declared the node dead, but
      the surviving workers' collectives fail at once ("Connection closed by peer"): a failure
      made only of such errors waits up to node_death_wait_s() for a node of the cluster to be
      declared dead since the last decision, and counts as a node loss if one is;
    - ReadersStarved is raised at once (a restart would starve again).
    Everything else is Ray's DefaultFailurePolicy.

    Ray 2.60 has no public hook for a failure policy (TorchTrainer.fit builds its default one), so
    launch.fit hands this one to the controller (`_initialize_and_run_controller`), which calls
    only `make_decision`. It lives here, not in launch.py, so that the controller actor, which
    unpickles it, imports no torch."""

    def __init__(self, failure_config):
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

        self.failure_config = failure_config
        self._default = DefaultFailurePolicy(failure_config)
        self.node_losses = 0
        self._dead = dead_nodes()  # nodes dead before the run: not its losses
        self._wait_s = node_death_wait_s()  # the driver's environment: what the GCS was started with

    def _lost_a_node(self, failures: list) -> bool:
        if any(node_lost(f) for f in failures):
            return True
        if not failures or not all(peer_lost(f) for f in failures):
            return False
        deadline = time.monotonic() + self._wait_s
        while True:
            if dead_nodes() - self._dead:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def make_decision(self, training_failed_error):
        import logging

        from ray.train.v2._internal.execution.failure_handling import FailureDecision
        from ray.train.v2.api.exceptions import WorkerGroupError

        log = logging.getLogger("ray.train")
        failures = list(getattr(training_failed_error, "worker_failures", {}).values())
        if not isinstance(training_failed_error, WorkerGroupError):
            return self._default.make_decision(training_failed_error)
        if any(readers_starved(f) for f in failures):
            log.error("[FailurePolicy] RAISE: the readers cannot get CPUs; a restart would not change that")
            return FailureDecision.RAISE
        lost = self._lost_a_node(failures)
        self._dead = dead_nodes()
        if not lost:
            return self._default.make_decision(training_failed_error)
        self.node_losses += 1
        limit = self.failure_config.max_preemption_failures
        if limit != -1 and self.node_losses > limit:
            log.error(f"[FailurePolicy] RAISE: {self.node_losses} node losses, max_preemption_failures={limit}")
            return FailureDecision.RAISE
        log.warning(f"[FailurePolicy] RETRY: a worker's node was lost (node loss {self.node_losses}"
                    f"{'' if limit == -1 else f' of at most {limit}'}; not counted against max_failures)")
        return FailureDecision.RETRY
