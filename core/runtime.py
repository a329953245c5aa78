"""The one place where model work runs: a fair queue in front of one worker thread per device.

Models are shared by every session of the app, and analyses install hooks on them (captum's layer hook,
neuron scalers, suppression masks). A hook is seen by every forward pass while it is installed, so two
analyses must never interleave on a model. Every function that runs a model is wrapped by `model_work`
and so runs on the scheduler's worker; a call made from inside a job runs inline, so analyses compose.

- One worker per device: on a 2-core CPU two jobs at once only thrash, and one worker is what makes
  hooks safe.
- Identical requests share one computation: a job has a key (the cache key) and a second request for a
  queued or running key joins it.
- Fair: the next job is the oldest one of the session that was served least recently, so one session's
  long list of jobs does not starve the others.
- Waiting callers see their place in the queue and then the job's progress (`JobStatus`).
- Abandoned work does not block the queue: a caller that stops waiting (a rerun, a closed tab) releases
  its job; a job nobody waits for is skipped, and a running one stops at its next progress report,
  unless somebody asks for it again within `ABANDON_GRACE` seconds (a rerun with the same input).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .device import model_device

log = logging.getLogger(__name__)
T = TypeVar("T")
ABANDON_GRACE = 3.0  # seconds; a Streamlit rerun with the same input asks again well within this
POLL_INTERVAL = 0.25
DEFAULT_OWNER = "local"


class JobCancelled(RuntimeError):
    """Raised inside a job that nobody waits for any more, at its next progress report."""


@dataclass(frozen=True)
class JobStatus:
    state: str  # "queued", "running", "done"
    ahead: int  # jobs that will start before this one (0 once it runs)
    done: int
    total: int


@dataclass(frozen=True)
class Waiter:
    """Who waits (a session id) and what to call while waiting (e.g. to draw a progress bar)."""

    owner: str
    on_wait: Callable[[JobStatus], None] | None = None
    on_finish: Callable[[], None] | None = None


class _Job:
    def __init__(self, number: int, key: str | None, owner: str, function: Callable[[], Any]):
        self.number = number
        self.key = key
        self.owner = owner
        self.function = function
        self.waiters: Counter[str] = Counter()
        self.abandoned_at: float | None = None
        self.state = "queued"
        self.progress = (0, 0)
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def abandoned_for(self, now: float) -> float:
        return 0.0 if self.abandoned_at is None else now - self.abandoned_at


_current = threading.local()


def in_model_job() -> bool:
    return getattr(_current, "job", None) is not None


def report_progress(done: int, total: int) -> None:
    """A progress callback for core functions: records progress on the running job.

    Outside a job it does nothing. Raises JobCancelled when nobody has waited for the job for longer
    than ABANDON_GRACE, so abandoned work stops early.
    """
    job: _Job | None = getattr(_current, "job", None)
    if job is None:
        return
    scheduler: ModelScheduler = _current.scheduler
    with scheduler._lock:
        job.progress = (int(done), int(total))
        if job.abandoned_for(time.monotonic()) > ABANDON_GRACE:
            raise JobCancelled(f"job {job.number} was abandoned")


class ModelScheduler:
    """A fair, deduplicating job queue in front of one worker thread (one device)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: list[_Job] = []
        self._running: _Job | None = None
        self._by_key: dict[str, _Job] = {}
        self._last_served: dict[str, int] = {}
        self._numbers = itertools.count(1)
        self._serve_clock = 0
        self._worker: threading.Thread | None = None
        self.waiter_provider: Callable[[], Waiter | None] | None = None

    # ------------------------------------------------------------------ callers

    def run(self, function: Callable[[], T], key: str | None = None, waiter: Waiter | None = None) -> T:
        """Run function on the worker and return its result (or raise its exception) in the caller.

        Inside a job it runs inline. key: requests with the same key while one is queued or running
        share its computation.
        """
        if in_model_job():
            return function()
        function = _with_callers_grad_mode(function)
        waiter = waiter or (self.waiter_provider() if self.waiter_provider else None) or Waiter(DEFAULT_OWNER)
        while True:
            job = self._submit(function, key, waiter.owner)
            finished = False
            try:
                while not job.finished.wait(POLL_INTERVAL):
                    if waiter.on_wait:
                        waiter.on_wait(self.status(job))
                finished = True
            finally:
                if not finished:
                    self._release(job, waiter.owner)
                if waiter.on_finish:
                    waiter.on_finish()
            if isinstance(job.error, JobCancelled):
                continue  # cancelled just before this caller joined it: ask again
            if job.error is not None:
                raise job.error
            return job.result

    def status(self, job: _Job) -> JobStatus:
        with self._lock:
            if job.state == "queued":
                order = self._start_order()
                ahead = order.index(job) + (self._running is not None) if job in order else 0
            else:
                ahead = 0
            return JobStatus(job.state, ahead, *job.progress)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue) + (self._running is not None)

    # ------------------------------------------------------------------ queue

    def _submit(self, function: Callable[[], Any], key: str | None, owner: str) -> _Job:
        with self._lock:
            job = self._by_key.get(key) if key is not None else None
            if job is None or job.state == "done":
                job = _Job(next(self._numbers), key, owner, function)
                self._queue.append(job)
                if key is not None:
                    self._by_key[key] = job
            job.waiters[owner] += 1
            job.abandoned_at = None
            self._ensure_worker()
            self._wakeup.notify_all()
            return job

    def _release(self, job: _Job, owner: str) -> None:
        with self._lock:
            job.waiters[owner] -= 1
            if job.waiters[owner] <= 0:
                del job.waiters[owner]
            if not job.waiters and not job.finished.is_set():
                job.abandoned_at = time.monotonic()
                log.info("job %d abandoned (%s)", job.number, job.state)
            self._wakeup.notify_all()

    def _start_order(self) -> list[_Job]:
        """The queued jobs in the order they will start: round robin over owners, oldest first within one."""
        last_served = dict(self._last_served)
        waiting = [job for job in self._queue if job.abandoned_at is None]
        order = []
        clock = self._serve_clock
        while waiting:
            job = min(waiting, key=lambda j: (last_served.get(j.owner, 0), j.number))
            clock += 1
            last_served[job.owner] = clock
            waiting.remove(job)
            order.append(job)
        return order

    def _forget_idle_owners(self) -> None:
        """Owners served before everyone now waiting would start first anyway, as new owners do."""
        waiting = {job.owner for job in self._queue}
        floor = min((self._last_served.get(owner, 0) for owner in waiting), default=self._serve_clock)
        for owner in [o for o, served in self._last_served.items() if served < floor and o not in waiting]:
            del self._last_served[owner]

    def _next_job(self) -> _Job | None:
        now = time.monotonic()
        for job in [j for j in self._queue if j.abandoned_for(now) > ABANDON_GRACE]:
            self._finish(job, error=JobCancelled(f"job {job.number} was abandoned before it started"))
        order = self._start_order()
        return order[0] if order else None

    def _finish(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        job.result, job.error, job.state = result, error, "done"
        if job in self._queue:
            self._queue.remove(job)
        if job.key is not None and self._by_key.get(job.key) is job:
            del self._by_key[job.key]
        job.function = None  # drop the closure (models, tensors) as soon as it is done
        job.finished.set()

    # ------------------------------------------------------------------ worker

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name=f"model-worker-{self.device}", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        _current.scheduler = self
        while True:
            with self._lock:
                job = self._next_job()
                while job is None:
                    self._wakeup.wait(ABANDON_GRACE)
                    job = self._next_job()
                self._queue.remove(job)
                job.state = "running"
                self._running = job
                self._serve_clock += 1
                self._last_served[job.owner] = self._serve_clock
                self._forget_idle_owners()
            log.info("model job %d started: key=%s owner=%s", job.number, job.key, job.owner)
            started = time.perf_counter()
            _current.job = job
            result, error = None, None
            try:
                result = job.function()
            except BaseException as caught:  # handed to the waiting callers, who re-raise it
                error = caught
            finally:
                _current.job = None
            log.info(
                "model job %d %s in %.2f s",
                job.number,
                "cancelled" if isinstance(error, JobCancelled) else "finished",
                time.perf_counter() - started,
            )
            with self._lock:
                self._running = None
                self._finish(job, result, error)


def _with_callers_grad_mode(function: Callable[[], T]) -> Callable[[], T]:
    """Grad and inference mode are per thread: the worker runs the function in the caller's modes."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_callers_mode() -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function()

    return in_callers_mode


_schedulers: dict[str, ModelScheduler] = {}
_schedulers_guard = threading.Lock()


def model_scheduler() -> ModelScheduler:
    """The scheduler of this process's device (core.device): every model of this process runs on its worker."""
    device = str(model_device())
    with _schedulers_guard:
        if device not in _schedulers:
            _schedulers[device] = ModelScheduler(device)
        return _schedulers[device]


def model_work(function: Callable[..., T]) -> Callable[..., T]:
    """Run the decorated function on the model worker (inline when already inside a job)."""

    @functools.wraps(function)
    def run_on_worker(*args, **kwargs):
        if in_model_job():
            return function(*args, **kwargs)
        return model_scheduler().run(lambda: function(*args, **kwargs))

    return run_on_worker


def require_model_job(what: str) -> None:
    """Hooks and other changes to a shared model are safe only inside a job, where nothing else runs."""
    if not in_model_job():
        raise RuntimeError(
            f"{what} changes a shared model, so it must run inside a model job "
            "(wrap the caller with core.runtime.model_work)"
        )
