"""CPU-time meter shared by the benchmarks: CPU seconds of this process and the local Ray it started."""

from __future__ import annotations


class TreeCpu:
    """CPU seconds (user + system) of this process and all its descendants (the local Ray: raylet,
    GCS, workers, actors) between ``start()`` and ``stop()``. A thread samples the process tree every
    0.2 s, so processes that exit in between (a Train worker, a Ray Data actor) count up to their
    last sample."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self.first, self.last = interval, {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool = False):
        import ray  # noqa: F401 - Ray ships psutil in its vendored packages
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            self.first.setdefault(key, t.user + t.system if initial else 0.0)  # a new process: all of its CPU
            self.last[key] = t.user + t.system

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "TreeCpu":
        self._sample(initial=True)
        self._t.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self._sample()
        return sum(v - self.first[k] for k, v in self.last.items())
