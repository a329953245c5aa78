"""The model scheduler: one job at a time, shared computations, a fair queue, abandoned jobs dropped."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from core import runtime
from core.neuron_attribution import attribute_neurons
from core.pair import ModelSpec, load_encoder
from core.runtime import ModelScheduler, Waiter, model_work, report_progress
from core.suppression import Neuron, suppressing
from core.token_attribution import IGSettings, attribute_pair


class Gate:
    """A job that holds the worker until the test opens it."""

    def __init__(self):
        self.started = threading.Event()
        self.opened = threading.Event()

    def __call__(self):
        self.started.set()
        assert self.opened.wait(10)
        return "gate"


def _in_thread(function, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = function(*args, **kwargs)
        except BaseException as error:  # the test inspects it
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_jobs_never_overlap():
    scheduler = ModelScheduler()
    inside, overlaps, lock = [0], [], threading.Lock()

    def job():
        with lock:
            inside[0] += 1
            overlaps.append(inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return threading.current_thread().name

    threads = [_in_thread(scheduler.run, job, waiter=Waiter(f"s{n}")) for n in range(6)]
    for thread, _ in threads:
        thread.join(10)
    assert max(overlaps) == 1
    assert {box["result"] for _, box in threads} == {"model-worker-cpu"}


def test_identical_requests_share_one_computation():
    scheduler = ModelScheduler()
    gate, calls = Gate(), []
    first = _in_thread(scheduler.run, gate, waiter=Waiter("x"))
    assert gate.started.wait(5)

    def compute():
        calls.append(1)
        return np.arange(3)

    waiting = [_in_thread(scheduler.run, compute, key="same", waiter=Waiter(f"s{n}")) for n in range(3)]
    _wait_until(lambda: scheduler.queue_length() == 2)  # the gate and one shared job
    gate.opened.set()
    for thread, _ in [first, *waiting]:
        thread.join(10)
    assert len(calls) == 1
    assert all(box["result"] is waiting[0][1]["result"] for _, box in waiting)


def test_queue_is_fair_between_sessions_and_shows_positions():
    scheduler = ModelScheduler()
    gate, started = Gate(), []
    statuses = {}
    threads = [_in_thread(scheduler.run, gate, waiter=Waiter("busy"))]
    assert gate.started.wait(5)

    def job(name):
        return lambda: started.append(name)

    def remember(name):
        return lambda status: statuses.__setitem__(name, status)

    for name, owner in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")):
        threads.append(_in_thread(scheduler.run, job(name), waiter=Waiter(owner, on_wait=remember(name))))
        _wait_until(lambda: scheduler.queue_length() == len(threads))
    _wait_until(lambda: len(statuses) == 4)
    assert statuses["a1"].state == "queued" and statuses["a1"].ahead == 1  # behind the running gate
    assert statuses["b1"].ahead == 2  # B is served before A's second job
    assert statuses["a3"].ahead == 4
    gate.opened.set()
    for thread, _ in threads:
        thread.join(10)
    assert started == ["a1", "b1", "a2", "a3"]


class Gone(Exception):
    """What Streamlit raises in a script thread whose session reran or closed."""


def test_an_abandoned_queued_job_never_runs(monkeypatch):
    monkeypatch.setattr(runtime, "ABANDON_GRACE", 0.2)
    scheduler = ModelScheduler()
    gate, ran = Gate(), []
    holder = _in_thread(scheduler.run, gate, waiter=Waiter("busy"))
    assert gate.started.wait(5)

    def leave(status):
        raise Gone

    thread, box = _in_thread(scheduler.run, lambda: ran.append("abandoned"), waiter=Waiter("tab", on_wait=leave))
    thread.join(5)
    assert isinstance(box["error"], Gone)
    time.sleep(0.3)
    gate.opened.set()
    holder[0].join(5)
    assert scheduler.run(lambda: "next", waiter=Waiter("other")) == "next"
    assert ran == []


def test_an_abandoned_running_job_stops_at_its_next_progress_report(monkeypatch):
    monkeypatch.setattr(runtime, "ABANDON_GRACE", 0.2)
    scheduler = ModelScheduler()
    steps = []

    def long_job():
        for step in range(500):
            steps.append(step)
            report_progress(step, 500)
            time.sleep(0.01)
        return "finished"

    def leave_after_start(status):
        if status.state == "running" and status.done > 3:
            raise Gone

    thread, box = _in_thread(scheduler.run, long_job, key="long", waiter=Waiter("tab", on_wait=leave_after_start))
    thread.join(10)
    assert isinstance(box["error"], Gone)
    started = time.monotonic()
    assert scheduler.run(lambda: "after", waiter=Waiter("other")) == "after"
    assert time.monotonic() - started < 2.0  # not the 5 s the abandoned job would have taken
    assert len(steps) < 100


def test_a_rerun_with_the_same_input_rejoins_its_running_job(monkeypatch):
    monkeypatch.setattr(runtime, "ABANDON_GRACE", 5.0)
    scheduler = ModelScheduler()
    calls = []

    def job():
        calls.append(1)
        for step in range(30):
            report_progress(step, 30)
            time.sleep(0.01)
        return "done"

    def leave(status):
        if status.state == "running":
            raise Gone

    thread, box = _in_thread(scheduler.run, job, key="k", waiter=Waiter("tab", on_wait=leave))
    thread.join(5)
    assert isinstance(box["error"], Gone)
    assert scheduler.run(job, key="k", waiter=Waiter("tab")) == "done"
    assert calls == [1]


def test_errors_reach_every_waiter_and_the_worker_survives():
    scheduler = ModelScheduler()

    def broken():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        scheduler.run(broken)
    assert scheduler.run(lambda: 7) == 7


def test_model_work_inside_a_job_runs_inline():
    @model_work
    def inner():
        return runtime.in_model_job()

    @model_work
    def outer():
        return inner()

    assert outer() is True
    assert runtime.in_model_job() is False


def test_hooks_outside_a_model_job_are_refused(tiny_bert_dir):
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="cls"))
    with pytest.raises(RuntimeError, match="model job"):
        with suppressing(encoder.query, [[Neuron(0, "intermediate", 1, 1.0)]]):
            pass


def test_two_threads_on_one_shared_model_match_the_serial_results(tiny_bert_dir, wiki_slice):
    """IG installs captum's hook and neuron attribution its scalers on the same model object."""
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean"))
    settings = IGSettings(n_steps=8, start_steps=None)
    query, title, text = "country in western europe", wiki_slice.titles[3], wiki_slice.texts[3]
    batch = encoder.query.tokenize([query])
    target = encoder.encode_passages([title], [text])[0]
    serial_ig = attribute_pair(encoder, query, title, text, settings)
    serial_neurons = attribute_neurons(encoder.query, batch, target, 10)

    results = {"ig": [], "neurons": []}

    def run_ig():
        for _ in range(4):
            results["ig"].append(attribute_pair(encoder, query, title, text, settings))

    def run_neurons():
        for _ in range(4):
            results["neurons"].append(attribute_neurons(encoder.query, batch, target, 10))

    threads = [_in_thread(run_ig), _in_thread(run_neurons)]
    for thread, box in threads:
        thread.join(120)
        assert "error" not in box, box.get("error")
    for pair in results["ig"]:
        for side in ("query", "passage"):
            ours, reference = getattr(pair, side), getattr(serial_ig, side)
            np.testing.assert_allclose(
                [t.score for t in ours.tokens], [t.score for t in reference.tokens], rtol=1e-5, atol=1e-7
            )
    for attribution in results["neurons"]:
        for site in ("intermediate", "output"):
            np.testing.assert_allclose(attribution.scores[site], serial_neurons.scores[site], rtol=1e-5, atol=1e-8)


def test_jobs_run_in_the_callers_grad_mode():
    scheduler = ModelScheduler()
    with torch.no_grad():
        assert scheduler.run(torch.is_grad_enabled) is False
    with torch.inference_mode():
        assert scheduler.run(torch.is_inference_mode_enabled) is True
    assert scheduler.run(torch.is_grad_enabled) is True
