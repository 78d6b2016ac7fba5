"""The queue's order and the plan that turns it into expected start and finish times."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.jobqueue import JobQueue, plan_queue
from watcher.jobs import Job, JobStatus


def job(name: str, sequence: int, priority: int = 0, model: str = "fake", **values) -> Job:
    values.setdefault("status", JobStatus.QUEUED)
    return Job(
        id=name,
        stem=name,
        subdir="",
        work=Path("/nonexistent") / name,
        sidecar_dir=Path("/inbox"),
        sequence=sequence,
        priority=priority,
        model=model,
        **values,
    )


def order(queue: JobQueue) -> list[str]:
    return [queued.id for queued in queue]


def test_higher_priority_first_then_first_come_first_served() -> None:
    queue = JobQueue()
    for queued in [
        job("a", 1),
        job("b", 2, priority=5),
        job("c", 3),
        job("d", 4, priority=5),
        job("e", 5, priority=-1),
    ]:
        queue.push(queued)
    assert order(queue) == ["b", "d", "a", "c", "e"]
    assert [queue.pop().id for _ in range(5)] == ["b", "d", "a", "c", "e"]
    assert queue.pop() is None


def test_a_job_that_was_running_at_the_stop_goes_first_again() -> None:
    queue = JobQueue()
    queue.push(job("urgent", 1, priority=9))
    queue.push(job("resumed", 2, status=JobStatus.IN_PROGRESS))
    assert order(queue) == ["resumed", "urgent"]


def test_the_order_does_not_depend_on_the_order_of_pushes() -> None:
    jobs = [job("a", 3), job("b", 1), job("c", 2, priority=1)]
    forwards, backwards = JobQueue(), JobQueue()
    for queued in jobs:
        forwards.push(queued)
    for queued in reversed(jobs):
        backwards.push(queued)
    assert order(forwards) == order(backwards) == ["c", "b", "a"]


def test_find_and_remove_by_folder_and_stem() -> None:
    queue = JobQueue()
    first, second = job("a", 1), job("b", 2)
    second.sidecar_dir = Path("/inbox/other")
    queue.push(first)
    queue.push(second)
    assert queue.find(Path("/inbox"), "a") is first
    assert queue.find(Path("/inbox"), "b") is None  # same stem elsewhere is another job
    assert queue.find(Path("/inbox/other"), "b") is second
    queue.remove(first)
    assert order(queue) == ["b"] and len(queue) == 1


def test_iterating_is_a_snapshot_safe_against_changes() -> None:
    queue = JobQueue()
    for index in range(3):
        queue.push(job(f"j{index}", index))
    for queued in queue:
        queue.remove(queued)
    assert len(queue) == 0


def test_plan_adds_run_times_and_a_load_at_each_switch_of_model() -> None:
    jobs = [job("a", 1), job("b", 2, model="other"), job("c", 3, model="other"), job("d", 4)]
    plans = plan_queue(
        jobs,
        run_seconds={"a": 10, "b": 20, "c": 30, "d": 40},
        load_seconds={"fake": 5, "other": 7},
        loaded_model="fake",
        running_left=100,
    )
    assert [(plans[name].start, plans[name].finish) for name in "abcd"] == [
        (100, 110),
        (117, 137),
        (137, 167),
        (172, 212),
    ]
    assert [plans[name].load for name in "abcd"] == [False, True, False, True]
    assert [plans[name].ahead for name in "abcd"] == [1, 2, 3, 4]  # the running job counts


def test_plan_when_nothing_runs_and_no_engine_is_loaded() -> None:
    plans = plan_queue(
        [job("a", 1), job("b", 2)],
        run_seconds={"a": 3, "b": 4},
        load_seconds={"fake": 60},
        loaded_model=None,
        running_left=None,
    )
    assert (plans["a"].start, plans["a"].finish, plans["a"].ahead, plans["a"].load) == (
        60,
        63,
        0,
        True,
    )
    assert (plans["b"].start, plans["b"].finish, plans["b"].ahead, plans["b"].load) == (
        63,
        67,
        1,
        False,
    )


@pytest.mark.parametrize("running_left", [0.0, None])
def test_a_running_job_about_to_end_still_counts_as_ahead(running_left: float | None) -> None:
    plans = plan_queue([job("a", 1)], {"a": 1}, {"fake": 0}, "fake", running_left)
    assert plans["a"].ahead == (0 if running_left is None else 1)
    assert plans["a"].finish == 1


def test_plan_of_an_empty_queue_is_empty() -> None:
    assert plan_queue([], {}, {}, "fake", 10) == {}
