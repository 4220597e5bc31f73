"""Who uses the CPU while a Ray run trains: per-process CPU time from /proc (Linux), sampled in a
background thread. This driver's descendants (the local Ray cluster it started) are grouped into
the training worker, Ray Data tasks and Ray's own background (raylet, GCS, dashboard, log monitor,
Ray Train's controller actors); then this driver; then everything else on the machine.

    with CpuSampler() as s:
        run_pretraining(cfg)
    s.cores()   # {"worker": 1.71, "data": 0.04, "ray": 0.17, "driver": 0.0, "other": 0.03}

`cores()` averages over the last `tail` share of the training worker's life (default its second
half; start-up, the first blocks and the allocator warm-up fall before it, like the steps before
the window whose samples/s the run reports).
Elsewhere than Linux it returns {}.
"""
from __future__ import annotations

import os
import threading
import time

GROUPS = ("worker", "data", "ray", "driver", "other")
_DATA = ("ray::IDLE", "MapBatches", "read_chunks", "ReadParquet", "FromItems", "from_items")


def _group(cmd: str) -> str:
    """The group of one of the driver's descendants."""
    if "RayTrainWorker" in cmd:
        return "worker"
    if any(k in cmd for k in _DATA):
        return "data"
    return "ray"  # ray:: actors, raylet, gcs_server, dashboard and agents, log monitor, …


def snapshot() -> dict[int, tuple[float, str, str]]:
    """{pid: (user + system CPU seconds, group, short name)} of every process readable in /proc."""
    hz, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, …
        name = cmd or stat[stat.find("(") + 1: stat.rfind(")")]
        procs[int(p)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / hz, name)
    out = {}
    for pid, (ppid, cpu, name) in procs.items():
        group, up = "other", pid
        while up in procs and up > 1:
            if up == me:
                group = "driver" if pid == me else _group(name)
                break
            up = procs[up][0]
        out[pid] = (cpu, group, _short(name))
    return out


def _short(cmd: str) -> str:
    """A readable process name: 'ray::TrainController', 'raylet', 'dashboard/agent.py', …"""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    script = next((w for w in words if w.endswith(".py")), None)
    return "/".join(script.split("/")[-2:]) if script else os.path.basename(words[0])


class CpuSampler:
    """Samples snapshot() every `every` seconds while the block runs."""

    def __init__(self, every: float = 0.5, tail: float = 0.5):
        self.every, self.tail, self.samples = every, tail, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), snapshot()))
            self._stop.wait(self.every)

    def __enter__(self):
        if os.path.isdir("/proc/self"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _window(self):
        """(first, last) sample of the last `tail` of the training worker's life, or None."""
        seen = [i for i, (_, s) in enumerate(self.samples) if any(v[1] == "worker" for v in s.values())]
        if len(seen) < 3:
            return None
        first = min(seen[-2], seen[-1] - max(1, round((seen[-1] - seen[0]) * self.tail)))
        return self.samples[first], self.samples[seen[-1]]

    def _used(self, key) -> dict[str, float]:
        """Cores per key(group, name) over the window; a process born in the window counts whole."""
        w = self._window()
        if w is None:
            return {}
        (ta, a), (tb, b) = w
        used: dict[str, float] = {}
        for pid, (cpu, group, name) in b.items():
            k = key(group, name)
            if k is not None:
                used[k] = used.get(k, 0.0) + cpu - a.get(pid, (0.0,))[0]
        return {k: round(v / (tb - ta), 3) for k, v in used.items()}

    def cores(self) -> dict[str, float]:
        """Mean cores used per group over the last `tail` of the training worker's life."""
        used = self._used(lambda group, name: group)
        return {g: used.get(g, 0.0) for g in GROUPS} if used else {}

    def processes(self, group: str = "ray", top: int = 6) -> dict[str, float]:
        """The `top` biggest users within `group`, by process name (same window as cores())."""
        used = self._used(lambda g, name: name if g == group else None)
        return dict(sorted(used.items(), key=lambda kv: -kv[1])[:top])
