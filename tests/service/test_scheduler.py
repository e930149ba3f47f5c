"""Continuous batching: jobs join a running batch, short ones finish first, results do not depend
on who shared the batch beyond floating-point reassociation, cancel stops within a step."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from service.energy import EnergyParams, Objective, Problem
from service.jobs.job import Job
from service.jobs.scheduler import Scheduler, SchedulerLimits, batch_key

SIZE = 24
MEAN = (120.0, 120.0, 120.0)


@pytest.fixture(scope="module")
def phi() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3), torch.nn.ReLU()
    )
    return net.requires_grad_(False)


def _job(phi: torch.nn.Module, steps: int, seeds: list[int], tap: str = "t", report_every: int = 0) -> Job:
    target = phi(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 50)[0]
    problems = [Problem(Objective.invert(target), EnergyParams(steps=steps, refine_steps=0), seed=s) for s in seeds]
    return Job(
        task="invert", model_id="m", tap_name=tap, phi=phi, problems=problems,
        descriptions=[f"seed {s}" for s in seeds], height=SIZE, width=SIZE, stride=2, mean_rgb255=MEAN,
        device=torch.device("cpu"), report_every=report_every, preview_every=0, return_tensor=False,
        contact_sheet=True, seeds=seeds,
    )  # fmt: skip


@contextlib.contextmanager
def _threads(n: int):
    """torch's thread count set to ``n`` for the block (the kernels' batch dependence varies with it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _collect(handle) -> tuple[list, list]:
    results, progress = [], []
    for kind, message in handle.events():
        (results if kind == "result" else progress).append((time.monotonic(), kind, message))
    return results, progress


def test_a_short_job_finishes_before_a_long_one_that_started_earlier(phi) -> None:
    """The long job cannot end on its own (10⁸ steps), so the order does not depend on speed."""
    scheduler = Scheduler()
    try:
        long = scheduler.submit(_job(phi, 10**8, [1], report_every=1))
        for kind, _ in long.events():
            if kind == "progress":  # the long job is stepping
                break
        short = scheduler.submit(_job(phi, 10, [2]))
        short_results, _ = _collect(short)
        assert len(short_results) == 1 and short_results[0][2].steps_run == 10
        assert not long.stats.end_time, "the long job must still be running when the short one is done"
        assert max(scheduler.batch_sizes) == 2  # they shared a batch
        long.cancel()
        _collect(long)
        assert long.stats.end_time > short.stats.end_time
    finally:
        scheduler.shutdown()


def test_results_are_the_same_alone_and_batched(phi) -> None:
    """The same seed gives the same image whoever else is in the batch. On CPU the batched
    convolution may reassociate sums (oneDNN picks its blocking by batch size), so the check is
    that the PNGs agree to within one grey level and the feature errors to 1e-3 relative; the
    figure actually measured is printed."""
    scheduler = Scheduler()
    try:
        alone = _collect(scheduler.submit(_job(phi, 40, [5])))[0][0][2]
        handles = [scheduler.submit(_job(phi, 40, [s])) for s in (5, 6, 7)]
        batched = _collect(handles[0])[0][0][2]
        for h in handles[1:]:
            _collect(h)
        a = np.frombuffer(alone.png, np.uint8)
        b = np.frombuffer(batched.png, np.uint8)
        from io import BytesIO

        from PIL import Image

        ia = np.asarray(Image.open(BytesIO(alone.png)), dtype=np.int16)
        ib = np.asarray(Image.open(BytesIO(batched.png)), dtype=np.int16)
        diff = int(np.abs(ia - ib).max())
        print(f"alone vs batched: max PNG difference {diff} grey levels; bytes equal: {np.array_equal(a, b)}")
        assert diff <= 1
        assert batched.feature_error == pytest.approx(alone.feature_error, rel=1e-3)
    finally:
        scheduler.shutdown()


def test_jobs_on_different_taps_run_in_separate_batches(phi) -> None:
    a, b = _job(phi, 5, [1], tap="a"), _job(phi, 5, [1], tap="b")
    assert batch_key(a) != batch_key(b)
    assert batch_key(a) == batch_key(_job(phi, 50, [3], tap="a"))


def test_cancel_stops_within_one_step_and_frees_the_batch(phi) -> None:
    scheduler = Scheduler()
    try:
        handle = scheduler.submit(_job(phi, 100000, [1], report_every=1))
        for kind, _ in handle.events():
            if kind == "progress":
                break
        handle.cancel()
        for _ in handle.events():
            pass
        assert handle.stats.steps_after_cancel is not None and handle.stats.steps_after_cancel <= 1
        deadline = time.monotonic() + 5
        while scheduler.running_rows() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running_rows() == 0
    finally:
        scheduler.shutdown()


def test_a_full_queue_is_refused_with_resource_exhausted(phi) -> None:
    from service.jobs.errors import ServiceError

    limits = SchedulerLimits(max_rows=1, max_pixels=SIZE * SIZE, max_total_pixels=SIZE * SIZE, max_queued=1)
    scheduler = Scheduler(limits)
    try:
        first = scheduler.submit(_job(phi, 100000, [1]))
        time.sleep(0.1)
        second = scheduler.submit(_job(phi, 10, [2]))  # waits: no room for another row
        with pytest.raises(ServiceError, match="retry"):
            scheduler.submit(_job(phi, 10, [3]))
        assert scheduler.describe()["queued"] == 1
        first.cancel()
        results, _ = _collect(second)  # admitted once the first left
        assert len(results) == 1
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize(("quantum", "joined"), [(1, True), (4, False)])
def test_padding_rows_count_against_a_batchs_pixels(phi, quantum: int, joined: bool) -> None:
    """max_pixels = 5 images: a 1-row job joins a running 4-row job, unless batches are padded to
    4 rows (batch-invariant mode), where the pair would run as 8 images."""
    scheduler = Scheduler(SchedulerLimits(max_pixels=5 * SIZE * SIZE), row_quantum=quantum)
    try:
        first = scheduler.submit(_job(phi, 400, [1, 2, 3, 4]))
        time.sleep(0.2)  # the first job is stepping
        _collect(scheduler.submit(_job(phi, 10, [5])))
        first.cancel()
        _collect(first)
        assert (max(scheduler.batch_sizes) == 5) == joined
    finally:
        scheduler.shutdown()


def test_a_job_larger_than_a_batch_runs_alone(phi) -> None:
    scheduler = Scheduler(SchedulerLimits(max_rows=2))
    try:
        results, _ = _collect(scheduler.submit(_job(phi, 5, [1, 2, 3])))
        assert sorted(r[2].target_index for r in results) == [0, 1, 2]
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("tap", ["/_blocks.10/Add", "/_fc/Gemm"])
def test_batch_invariant_mode_makes_the_bundled_model_exact_alone_and_batched(tap: str) -> None:
    """ServerConfig.batch_invariant on the real model: the network runs on batches padded to a
    multiple of 4 rows (service/jobs/batch_invariance.py), and a job's image is then identical alone and
    in a batch of 6, in the first and in the last, partial block of rows. Two threads, as a server
    has: with the default batches, oneDNN's convolutions and MKL's Gemm differ by batch size."""
    from converters.bundled import bundled_models
    from converters.model import load_model
    from service.energy import channel_weights, minimize
    from service.jobs.batch_invariance import CPU_ROW_QUANTUM

    model = load_model(bundled_models()[0].path, verify=False)
    phi = model.representation(model.tap(tap))
    stride = model.tap(tap).stride
    shape = phi(torch.zeros(1, 3, 64, 64)).shape[1:]
    problems = [
        Problem(Objective.maximize(channel_weights(shape, c, receptive_field=64, channel_max=5.0)),
                EnergyParams(steps=8), seed=c)
        for c in range(6)
    ]  # fmt: skip

    def run(batch: list[Problem], quantum: int) -> list[np.ndarray]:
        return [r.image_uint8 for r in minimize(phi, batch, height=64, width=64, stride=stride, row_quantum=quantum)]

    with _threads(2):
        batched = run(problems, CPU_ROW_QUANTUM)
        alone = {i: run([problems[i]], CPU_ROW_QUANTUM)[0] for i in (0, 5)}
        default_batched = run(problems, 1)
        default_alone = {i: run([problems[i]], 1)[0] for i in (0, 5)}
    for i in (0, 5):
        apart = int(np.abs(default_alone[i].astype(int) - default_batched[i].astype(int)).max())
        print(f"{tap} row {i}: default batches {apart} grey levels apart alone vs batched")
        assert np.array_equal(alone[i], batched[i]), f"{tap} row {i}"


def test_padding_rows_are_zero_images_and_change_nothing(phi) -> None:
    """The minimizer's padding: the network sees a multiple of the quantum, the extra rows are
    zero images, and on a network whose kernels do not depend on the batch size (one thread, this
    small net) the padded run gives the unpadded run's images exactly."""
    from service.energy import minimize

    seen: list[tuple[int, float]] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], float(x[1:].abs().sum()) if x.shape[0] > 1 else 0.0))
        return phi(x)

    target = phi(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 50)[0]
    problem = Problem(Objective.invert(target), EnergyParams(steps=5, refine_steps=0), seed=3)
    with _threads(1):
        padded = minimize(recording, [problem], height=SIZE, width=SIZE, stride=2, row_quantum=4)[0]
        plain = minimize(phi, [problem], height=SIZE, width=SIZE, stride=2)[0]
    steps = [s for s in seen if s[0] != 1]  # the final measurement on the PNG runs one image
    assert len(steps) == 5 and all(n == 4 and pad_sum == 0.0 for n, pad_sum in steps)
    assert np.array_equal(padded.image_uint8, plain.image_uint8)


def test_rows_with_their_own_settings_are_exact_alone_and_batched(phi) -> None:
    """A batch mixes rows whose settings differ (optimizer, β, C, learning rate, task, stage):
    in batch-invariant mode each row's image is bit-identical to the same problem run alone.
    The minimizer groups rows that agree and steps each group with plain floats, so nothing in a
    row's arithmetic depends on its neighbours'."""
    from service.energy import channel_weights, minimize
    from service.jobs.batch_invariance import CPU_ROW_QUANTUM

    target = phi(torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 50)[0]
    problems = [
        Problem(Objective.invert(target), EnergyParams(steps=12, refine_steps=6), seed=1),
        Problem(Objective.invert(target), EnergyParams(steps=6, refine_steps=4, beta=1.5, loss_weight=50.0), seed=2),
        Problem(Objective.invert(target), EnergyParams(steps=15, optimizer="adam", learning_rate=3.0), seed=3),
        Problem(Objective.maximize(channel_weights(target.shape, 2, receptive_field=7, channel_max=1.0)),
                EnergyParams(steps=10, momentum=0.8, alpha=4.0), seed=4),
    ]  # fmt: skip

    def run(batch: list[Problem]) -> list[np.ndarray]:
        return [r.image_uint8 for r in minimize(phi, batch, height=SIZE, width=SIZE, stride=2,
                                                row_quantum=CPU_ROW_QUANTUM)]  # fmt: skip

    with _threads(2):
        alone = [run([p])[0] for p in problems]
        batched = run(problems)
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert np.array_equal(a, b), f"row {i}: {int(np.abs(a.astype(int) - b.astype(int)).max())} grey levels apart"
    assert len({a.tobytes() for a in alone}) == len(alone)  # the rows really are different problems
