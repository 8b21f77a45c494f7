"""Where shards of work run: in this process, or on Ray workers (local, started on demand, or an
existing cluster). Work is cut into shards that do not depend on the number of workers, so the
results are the same however many run them; a pool only decides where each shard runs.

Ray is an optional extra (``pip install 'vitcompress[ray]'``): without it, or with one worker and
no address, everything runs here as before.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import VitcompressError

RAY_INSTALL = "pip install 'vitcompress[ray]'"
TASK_RETRIES = 2  # a shard whose worker dies is run again this many times before the run fails


@dataclass(frozen=True)
class Workers:
    """How many workers, and where: ``address`` names a running Ray cluster (``ray://host:10001``
    or ``auto``); without it, ``count`` > 1 starts a local Ray instance for the job."""
    count: int = 1
    address: str | None = None

    def __post_init__(self):
        if self.count < 1:
            raise VitcompressError(f"--workers must be at least 1, got {self.count}")

    @property
    def distributed(self) -> bool:
        return self.count > 1 or self.address is not None


class LocalPool:
    """Runs every shard here, in order."""

    in_process = True

    def __init__(self) -> None:
        self.info = {"backend": "in-process", "workers": 1, "startup_seconds": 0.0}

    def map(self, fn: Callable, shards: Sequence[tuple], on_done: Callable[[int, Any], None] | None = None,
            here: Callable[[int], Any] | None = None) -> list:
        """``fn(*shard)`` for every shard, in order (``here(i)`` instead, when given: the same result)."""
        results = []
        for i, args in enumerate(shards):
            results.append(here(i) if here is not None else fn(*args))
            if on_done:
                on_done(i, results[-1])
        return results


class RayPool:
    """Runs shards as Ray tasks, one CPU each, retried when their worker dies; results in shard order.

    Ray starts on the first ``map`` (or ``start``), not when the pool is made: a map that can run
    shards here (``here``) works through them on a driver thread while Ray starts, so the start-up
    seconds are not spent waiting. ``ray.init`` itself stays on the calling thread (Ray's node
    processes do not survive a start from another thread)."""

    in_process = False

    def __init__(self, workers: Workers) -> None:
        try:
            import ray
        except ImportError:
            raise VitcompressError(f"--workers/--ray-address need Ray: {RAY_INSTALL}") from None
        if workers.address is not None and not ray.is_initialized():
            _probe(workers.address)  # an address that does not answer fails now, in one line
        self.ray = ray
        self.workers = workers
        self.started_here = False
        self.info = {"backend": "ray", "address": workers.address or "local", "workers": workers.count,
                     "startup_seconds": None, "task_retries": TASK_RETRIES}

    def start(self) -> None:
        """Start (or join) Ray, once; ``info`` then says how many workers and how long it took."""
        if self.info["startup_seconds"] is not None:
            return
        ray, workers = self.ray, self.workers
        t0 = time.perf_counter()
        if not ray.is_initialized():
            if workers.address is None:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance: no token files written
            try:
                if workers.address is not None:
                    ray.init(address=workers.address, log_to_driver=False)
                else:
                    ray.init(num_cpus=workers.count, include_dashboard=False, log_to_driver=False)
            except Exception as e:  # ray raises ConnectionError, RuntimeError, ValueError... for a bad address
                raise VitcompressError(f"cannot start or reach Ray ({workers.address or 'local'}): {str(e).splitlines()[0]}") from None
            self.started_here = True
        cpus = int(ray.cluster_resources().get("CPU", workers.count))
        self.info.update(workers=min(workers.count, cpus) if workers.address is None else cpus,
                         startup_seconds=round(time.perf_counter() - t0, 2))

    def map(self, fn: Callable, shards: Sequence[tuple], on_done: Callable[[int, Any], None] | None = None,
            here: Callable[[int], Any] | None = None) -> list:
        """``fn(*shard)`` for every shard, on the workers. With ``here`` (shard index -> the same result,
        computed in this process) the driver works until the first worker answers: workers take shards
        from the front, the driver from the back, so it fills Ray's and the workers' start-up time
        instead of waiting (after that it would only take cores from them)."""
        queue = list(range(len(shards)))
        results: list = [None] * len(shards)
        lock = threading.Lock()
        stop_driver = threading.Event()  # set when a worker answers, the driver fails or the map ends
        failure: list[BaseException] = []

        def finish(i: int, result: Any) -> None:
            with lock:
                results[i] = result
                if on_done:
                    on_done(i, result)

        def driver() -> None:
            while not stop_driver.is_set():
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                try:
                    finish(i, here(i))
                except BaseException as e:  # raised again on the calling thread
                    failure.append(e)
                    stop_driver.set()

        helper = threading.Thread(target=driver, name="vitcompress-driver-shards", daemon=True) if here else None
        if helper:
            helper.start()
        try:
            self.start()
            self._run_on_workers(fn, shards, queue, lock, finish, stop_driver, failure)
        finally:
            stop_driver.set()
            if helper:
                helper.join()
        if failure:
            raise failure[0]
        return results

    def _run_on_workers(self, fn: Callable, shards: Sequence[tuple], queue: list, lock: threading.Lock,
                        finish: Callable[[int, Any], None], stop_driver: threading.Event, failure: list) -> None:
        """Feed the queue's front to the workers until it is empty and every task has answered."""
        ray = self.ray
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_in_worker(fn))
        pending: dict = {}
        while True:
            if failure:  # the driver's shard failed: the run ends with its error
                for ref in pending:
                    ray.cancel(ref, force=True)
                return
            with lock:
                while queue and len(pending) < self.info["workers"]:
                    i = queue.pop(0)
                    pending[task.remote(*shards[i])] = i
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # a timeout, so a driver failure is seen
            for ref in done:
                i = pending.pop(ref)
                finish(i, self._result(ref, i, len(shards), pending))
                stop_driver.set()

    def _result(self, ref, i: int, total: int, pending: dict) -> Any:
        """A finished task's result, or one line saying which shard failed (the others are cancelled)."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
            for other in pending:
                ray.cancel(other, force=True)
            if isinstance(cause, VitcompressError):
                raise cause from None
            raise VitcompressError(f"shard {i + 1} of {total} failed on a Ray worker: {type(cause).__name__}: "
                                   f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
        except ray.exceptions.RayError as e:  # the worker died on every try
            for other in pending:
                ray.cancel(other, force=True)
            raise VitcompressError(f"shard {i + 1} of {total} failed on a Ray worker after {TASK_RETRIES} retries: "
                                   f"{type(e).__name__}") from None

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, at once, when a cluster address does not answer (ray.init would keep retrying)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except ValueError:
        raise VitcompressError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto") from None
    except OSError as e:
        raise VitcompressError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def _in_worker(fn: Callable) -> Callable:
    """``fn`` as a worker runs it: one thread per worker (the workers share the cores)."""
    def run(*args):
        import torch

        torch.set_num_threads(1)
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "shard")
    return run


@contextlib.contextmanager
def open_pool(workers: Workers) -> Iterator[LocalPool | RayPool]:
    """The pool for ``workers``: in-process, or Ray (stopped again on exit if started here)."""
    if not workers.distributed:
        yield LocalPool()
        return
    pool = RayPool(workers)
    try:
        yield pool
    finally:
        pool.close()
