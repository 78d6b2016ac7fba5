"""`batchbox serve`: the main loop of the appliance.

An inbox event or rescan names a candidate; settling decides it is complete; claiming
renames it into the spool; validation counts and checks it and the estimator writes the ETA;
the queue hands it to the engine process; the runner turns lines into results; delivery
renames a finished folder into the outbox and records the benchmark.

The main loop does everything except running a job, which happens on one worker thread
(the engine itself is in a child process), so events, cancels, sidecars and the systemd
watchdog are served while a job runs.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import structlog

from benchmarks.estimator import load_seconds_for
from benchmarks.record import knows_pace, read_history
from benchmarks.refine import Refined, refine
from runner.durable import (
    is_disk_trouble,
    is_out_of_space,
    remove_temporaries,
    write_json_atomic,
)
from runner.run import Progress
from watcher.claim import (
    ClaimError,
    ClaimInterrupted,
    ClaimLost,
    claim_and_validate,
    take_ticket_left_behind,
)
from watcher.config import Config
from watcher.engines import EnginePool
from watcher.execute import (
    INPUT,
    DiskTrouble,
    RunHooks,
    check_job,
    estimate_job,
    execute_job,
    finish_job,
)
from watcher.forecast import eta_basis as queue_basis
from watcher.inbox import Candidate, classify, scan_inbox, start_observer
from watcher.jobqueue import JobQueue, Planned, plan_queue
from watcher.jobs import (
    JOB_RECORD,
    Job,
    JobStatus,
    fail_job,
    iso,
    load_job,
    mark_finished,
    mark_queued,
    now,
    write_eta,
    write_status,
)
from watcher.machine import one_filesystem_problem
from watcher.notify import notify, watchdog_interval
from watcher.settle import CHANGE_HINTS, Settler
from watcher.tickets import TicketError, find_ticket, load_ticket

log = structlog.get_logger()

STATUS_SECONDS = 5.0  # sidecars of a running job are rewritten at least this often
# The sidecars of queued jobs are brought up to date QUEUE_MIN_SECONDS after a change of the
# queue and at least every QUEUE_SECONDS. Each write is an fsync, so a job's sidecars are
# rewritten only when what they show has changed (or to refresh a stale `.eta`), front of the
# queue first; a long queue is done over several turns of the loop (SLICE_SECONDS each), and
# the next pass waits UPKEEP_RATIO times as long as the last one took, so that keeping a long
# queue's sidecars current never takes more than a fifth of the loop's time.
QUEUE_MIN_SECONDS = 1.0
QUEUE_SECONDS = 5.0
UPKEEP_RATIO = 4.0
ETA_REFRESH_SECONDS = 60.0
ETA_SLACK_SECONDS = 5.0  # an expected finish that moved less than this is not rewritten
SLICE_SECONDS = 0.5  # claiming a burst and rewriting a long queue yield to the loop this often
SWEEP_SECONDS = 60.0
# After a write fails for a full or failing disk, nothing is claimed or started for this long
# (doubled at each failure in a row, up to DISK_RETRY_MAX_SECONDS), and after a full disk
# not before free space is back above the floor (min_free_bytes, and DISK_MARGIN_BYTES at
# least, so that a disk with min_free_bytes 0 is not retried while still full).
DISK_RETRY_SECONDS = 30.0
DISK_RETRY_MAX_SECONDS = 600.0
DISK_MARGIN_BYTES = 1 << 20


class StartError(Exception):
    """The service cannot start; the message says why in one sentence."""


@dataclass
class Running:
    job: Job
    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0  # the expected model load before it runs, 0 when loaded
    run_started: float | None = None
    done: float = 0.0  # the fraction of the job's requests done
    last_status: float = 0.0
    outcome: Path | None = None
    latest: Progress | None = None
    counters: tuple[int, int] = (0, 0)  # the engine's token counters in this run, last seen
    counted_at: float | None = None  # when they last moved; None until they first do
    # tokens of requests finished before a restart, which this run's engine did not count
    earlier_tokens: tuple[int, int] | None = None
    trouble: OSError | None = None  # the disk error that stopped it, to resume later


class Service:
    def __init__(self, config: Config, pool: EnginePool | None = None) -> None:
        self.config = config
        self.inbox = config.folder("inbox")
        self.outbox = config.folder("outbox")
        self.state = config.folder("state")
        self.pool = pool or EnginePool()
        # A model the history knows nothing of has its engine's pace timed at its load;
        # then every job waiting for it is estimated again.
        self.pool.wants_pace = lambda spec: not knows_pace(self.state, spec.alias)
        self.pace_measured = threading.Event()
        self.events: queue.Queue[Candidate] = queue.Queue()
        self.settler = Settler(config.settle_seconds)
        self.queue = JobQueue()
        self.queue_changed = False
        self.queue_pass_unfinished = False
        self.queue_pass_seconds = 0.0  # time spent on the current or last pass
        self.eta_written: dict[str, float] = {}  # job id -> when its queued `.eta` was written
        # Complete files waiting to be claimed, in the order they settled (an ordered set).
        self.ready: dict[Path, None] = {}
        self.low_disk = False
        # Spool folders of jobs that a disk error cut short, to be picked up again from their
        # records (as at a start) once the disk allows.
        self.readopt: set[Path] = set()
        # files refused at claim, with what they were then, so a rescan does not repeat it
        self.turned_away: dict[Path, tuple[int, int, int]] = {}
        self.disk_wait_until = 0.0
        self.disk_needs_space = False
        self.disk_failures = 0
        # Paused jobs whose note could not be written for want of space: tried again now
        # and then while they wait, so the sidecar says why nothing moves.
        self.unwritten_notes: dict[Path, Job] = {}
        self.last_note_attempt = 0.0
        self.running: Running | None = None
        self.stopping = threading.Event()
        self.observer = None
        self.last_rescan = 0.0
        self.last_queue_update = 0.0
        self.last_sweep = 0.0
        self.last_watchdog = 0.0

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        problem = one_filesystem_problem(self.config)
        if problem:
            raise StartError(problem)
        for alias in self.config.models:
            (self.inbox / alias).mkdir(parents=True, exist_ok=True)
        (self.state / "jobs").mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.recover()
        self.observer = start_observer(
            self.inbox, self.events.put, polling=self.config.observer == "polling"
        )
        self.rescan()
        notify("READY=1")
        log.info("service_ready", inbox=str(self.inbox), queued=len(self.queue))

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """Stop the running job where it is (it resumes at the next start) and the engine."""
        notify("STOPPING=1")
        self.stopping.set()
        if self.running is not None:
            self.running.thread.join(self.config.stop_timeout_seconds * 0.6)
            self.reap()
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(2)
        self.pool.close(timeout=self.config.stop_timeout_seconds * 0.3)
        log.info("service_stopped")

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.is_set():
                self.tick()
                self.wait()
        finally:
            self.shutdown()

    def wait(self) -> None:
        try:
            candidate = self.events.get(timeout=0.2)
        except queue.Empty:
            return
        self.events.put(candidate)

    # -- one turn of the loop -----------------------------------------------------------

    def tick(self) -> None:
        """One turn of the loop. An error of the disk (or of a folder) never ends the
        service: every job it touched is in the spool, from where it is picked up again."""
        try:
            self.turn()
        except OSError as error:
            if is_disk_trouble(error):
                self.disk_trouble(error)
            else:
                log.exception("tick_failed", error=str(error))
        finally:
            self.ping()

    def turn(self) -> None:
        self.take_events()
        if time.monotonic() - self.last_rescan >= self.config.rescan_seconds:
            self.rescan()
        self.settle()
        self.claim_ready()
        self.reap()
        if self.unwritten_notes:
            self.write_waiting_notes()
        if self.readopt and self.disk_ready():
            self.readopt_jobs()
        if self.running is None and not self.stopping.is_set() and self.disk_ready():
            self.start_next()
        if self.pace_measured.is_set():
            self.estimate_queue_again()
        if self.queue_update_due():
            self.update_queue()
        if self.running is None and len(self.queue) == 0:
            self.pool.unload_if_idle(self.config.idle_unload_seconds)
        if time.monotonic() - self.last_sweep >= SWEEP_SECONDS:
            self.sweep_status_files()

    def take_events(self) -> None:
        while True:
            try:
                candidate = self.events.get_nowait()
            except queue.Empty:
                return
            self.note(candidate)

    def note(self, candidate: Candidate) -> None:
        kind = classify(candidate.path.name)
        if kind == "job":
            if candidate.path in self.ready:
                if candidate.hint not in CHANGE_HINTS:
                    return  # settled already and waiting its turn to be claimed
                del self.ready[candidate.path]  # written to again: it must settle anew
            self.settler.note(candidate.path, candidate.hint)
        elif kind == "cancel":
            self.cancel(candidate.path)

    def rescan(self) -> None:
        self.last_rescan = time.monotonic()
        for candidate in scan_inbox(self.inbox):
            self.note(candidate)

    # -- settling and claiming ----------------------------------------------------------

    def settle(self) -> None:
        result = self.settler.settle()
        for path, reason in result.refused:
            self.refuse(path, reason)
        self.ready.update(dict.fromkeys(result.complete))

    def claim_ready(self) -> None:
        """Claim complete files in the order they settled, for a slice of time at most: a
        burst of hundreds of drops must not hold up the start of the first job, cancels and
        the watchdog."""
        started = time.monotonic()
        while self.ready and not self.stopping.is_set():
            if time.monotonic() - started >= SLICE_SECONDS or not self.disk_space_left():
                return
            if not self.disk_ready():
                return
            path = next(iter(self.ready))
            del self.ready[path]
            self.claim(path)

    def disk_space_left(self) -> bool:
        low = shutil.disk_usage(self.state).free < self.config.min_free_bytes
        if low != self.low_disk:
            self.low_disk = low
            if low:
                log.warning("low_disk_space", waiting=len(self.ready))
            else:
                log.info("disk_space_back", waiting=len(self.ready))
        return not low

    def claim(self, path: Path) -> None:
        try:
            stat = path.lstat()
        except OSError:
            return
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self.turned_away.get(path) == signature:
            return  # refused before and unchanged since: once is enough
        problem = unclaimable(path)
        if problem is not None:
            self.turned_away[path] = signature
            self.refuse(path, problem, "invalid_name")
            return
        try:
            job = claim_and_validate(path, self.config, time.time_ns())
        except ClaimLost:
            return
        except ClaimInterrupted as interrupted:
            log.warning("claim_interrupted", path=str(path), error=str(interrupted.error))
            self.readopt.add(interrupted.work)
            if is_disk_trouble(interrupted.error):
                self.disk_trouble(interrupted.error)
            return
        except OSError as error:
            if is_disk_trouble(error):
                # Nothing moved: the file waits in the inbox, first in line, for the disk.
                self.ready = {path: None, **self.ready}
                self.disk_trouble(error)
                return
            self.refuse(path, f"{path.name} could not be taken: {error}", "claim_failed")
            return
        except ClaimError as error:
            self.turned_away[path] = signature
            self.refuse(path, f"{path.name} could not be taken: {error}", "claim_failed")
            return
        except Exception as error:  # noqa: BLE001 - one odd file must not stop the appliance
            log.exception("claim_crashed", path=os.fsdecode(path))
            self.turned_away[path] = signature
            self.refuse(path, f"the file could not be taken: {error}", "claim_failed")
            return
        log.info("job_claimed", job=job.id, input=job.input_name, model=job.model)
        if job.errors:
            self.deliver_failed(job)
            return
        self.enqueue(job)
        cancel = path.with_name(f"{job.stem}.cancel")
        if cancel.exists():
            self.cancel(cancel)  # dropped while the file was still settling

    def enqueue(self, job: Job) -> None:
        """Queue a validated job: its `.eta` and `.status` say where it stands at once; the
        jobs it overtook learn their new places at the next queue update."""
        job.estimate = estimate_job(job, self.state).as_dict()
        self.queue.push(job)
        self.queue_changed = True
        for position, queued, plan in self.planned():
            if queued is job:
                job.queue_position = position
                self.show_eta(job, plan)
        mark_queued(job)

    def refuse(self, path: Path, reason: str, code: str = "not_a_regular_file") -> None:
        """A name that looks like a job but cannot be taken: say why beside it."""
        log.warning("file_refused", path=str(path), reason=reason)
        status = path.with_name(f"{path.stem}.status")
        moment = iso(now())
        # Every key of the status format, so that scripts reading it find what they expect.
        document = {
            "id": None,
            "input": os.fsdecode(path.relative_to(self.inbox)).encode("utf-8", "replace").decode(),
            "model": None,
            "endpoint": None,
            "status": "failed",
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "queue_position": None,
            "created_at": moment,
            "in_progress_at": None,
            "completed_at": moment,
            "updated_at": moment,
            "eta": None,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "throughput": None,
            "outbox": None,
            "errors": [{"code": code, "message": reason}],
        }
        try:
            write_json_atomic(status, document)
        except OSError as error:  # its folder went away meanwhile: the log says it all
            log.warning("status_not_written", path=str(status), error=str(error))

    def deliver_failed(self, job: Job) -> None:
        self.finish(job, JobStatus.FAILED)

    def finish(self, job: Job, final: JobStatus) -> bool:
        """Deliver a job that is not running; on a disk error it is picked up again later."""
        try:
            finish_job(job, self.config, self.outbox, final)
        except OSError as error:
            if not is_disk_trouble(error):
                raise
            log.warning("job_not_delivered", job=job.id, error=str(error))
            self.readopt.add(job.work)
            self.disk_trouble(error)
            return False
        log.info("job_finished", **job.summary())
        self.disk_failures = 0
        return True

    # -- a full or failing disk ---------------------------------------------------------

    def disk_trouble(self, error: OSError) -> None:
        """Hold off claiming and starting work for a while, and until there is space."""
        self.disk_failures += 1
        delay = min(DISK_RETRY_SECONDS * 2 ** (self.disk_failures - 1), DISK_RETRY_MAX_SECONDS)
        self.disk_wait_until = max(self.disk_wait_until, time.monotonic() + delay)
        self.disk_needs_space = self.disk_needs_space or is_out_of_space(error)
        log.warning(
            "disk_trouble", error=str(error), retry_seconds=delay, jobs_waiting=len(self.readopt)
        )

    def disk_ready(self) -> bool:
        """Whether work may go on: no disk error lately, or its wait is over and, after a
        full disk, space is back."""
        if not self.disk_wait_until:
            return True
        if time.monotonic() < self.disk_wait_until:
            return False
        if self.disk_needs_space:
            floor = max(self.config.min_free_bytes, DISK_MARGIN_BYTES)
            if shutil.disk_usage(self.state).free < floor:
                return False
        log.info("disk_ready", jobs_waiting=len(self.readopt))
        self.disk_wait_until = 0.0
        self.disk_needs_space = False
        return True

    def readopt_jobs(self) -> None:
        """Pick up, from their spool records, the jobs a disk error cut short."""
        for work in sorted(self.readopt):
            self.readopt.discard(work)
            self.unwritten_notes.pop(work, None)  # its record on disk is what counts now
            if not self.adopt(work):
                return  # the disk failed again: the rest wait with it

    def adopt(self, work: Path) -> bool:
        """Recover one spool folder into the queue (or the outbox); False on a disk error."""
        if not (work / JOB_RECORD).is_file():
            return True  # delivered meanwhile, or never recorded
        job = None
        try:
            job = load_job(work)
            self.recover_job(job)
        except OSError as error:
            if not is_disk_trouble(error):
                raise
            if job is not None and job in self.queue.jobs:
                self.queue.remove(job)
            self.readopt.add(work)
            self.disk_trouble(error)
            return False
        except (ValueError, KeyError, TypeError) as error:
            # Records are written atomically, so this is someone else's doing: keep the
            # folder for a person to look at, and serve the other jobs.
            log.error("job_record_unreadable", work=str(work), error=str(error))
        return True

    def pause_for_disk(self, job: Job, error: OSError) -> None:
        """A job the disk stopped: say so beside it; it resumes from its journal later."""
        trouble = DiskTrouble(error)
        job.errors = [note for note in job.errors if note.get("code") != trouble.code]
        job.errors.append(
            {
                "code": trouble.code,
                "message": f"{trouble.reason}; the job waits and resumes where it stopped",
            }
        )
        # A job stopped while finishing keeps the record finish_job wrote: the sidecar must
        # not say "completed" before its outbox folder is there.
        if not (job.status.finished or job.status is JobStatus.FINALIZING):
            self.unwritten_notes[job.work] = job
            self.write_waiting_notes()
        self.readopt.add(job.work)
        self.disk_trouble(error)

    def write_waiting_notes(self) -> None:
        if time.monotonic() - self.last_note_attempt < QUEUE_MIN_SECONDS:
            return
        self.last_note_attempt = time.monotonic()
        for work, job in list(self.unwritten_notes.items()):
            try:
                write_status(job)
            except OSError as error:
                log.warning("status_not_written", job=job.id, error=str(error))
                return
            del self.unwritten_notes[work]

    # -- running ------------------------------------------------------------------------

    def start_next(self) -> None:
        job = self.queue.pop()
        if job is None:
            return
        self.queue_changed = True
        self.eta_written.pop(job.id, None)
        running = Running(job=job, thread=threading.Thread(target=lambda: None))
        if self.pool.model != job.model:
            running.load_seconds = load_seconds_for(job.model or "", read_history(self.state))
        hooks = RunHooks(
            on_progress=lambda job, progress: self.progress(running, progress),
            on_pace=lambda job: self.pace_measured.set(),
            cancel_requested=running.cancel.is_set,
            stop_requested=self.stopping.is_set,
        )

        def work() -> None:
            try:
                running.outcome = execute_job(job, self.config, self.pool, self.outbox, hooks)
            except DiskTrouble as trouble:
                running.trouble = trouble.error
            except Exception as error:  # noqa: BLE001 - a bug must not leave it in_progress
                log.exception("job_crashed", job=job.id)
                running.trouble = self.fail_crashed(job, error)
            finally:
                self.events.put(Candidate(self.inbox, "job-finished"))

        running.thread = threading.Thread(target=work, name=f"job-{job.id}", daemon=True)
        self.running = running
        log.info("job_started", job=job.id, input=job.input_name, model=job.model)
        running.thread.start()

    def fail_crashed(self, job: Job, error: Exception) -> OSError | None:
        """Deliver a job whose run raised something unforeseen as failed, with what it has;
        the disk error that stopped the delivery, if one did (it is delivered later).

        When the service is stopping, the job stays in the spool and resumes at the next
        start instead: the error may be the stop itself (an engine ended under it)."""
        if self.stopping.is_set():
            return None
        try:
            fail_job(job, "internal_error", f"the run failed: {type(error).__name__}: {error}")
            finish_job(job, self.config, self.outbox, JobStatus.FAILED)
        except OSError as delivery_error:
            if is_disk_trouble(delivery_error):
                return delivery_error
            log.exception("job_not_delivered", job=job.id)
        except Exception:  # noqa: BLE001 - the spool keeps it for the next start
            log.exception("job_not_delivered", job=job.id)
        return None

    def progress(self, running: Running, progress: Progress) -> None:
        job = running.job
        if running.run_started is None:
            running.run_started = time.monotonic()
        if running.earlier_tokens is None:
            running.earlier_tokens = (
                progress.tally.prompt_tokens,
                progress.tally.completion_tokens,
            )
        running.latest = progress
        running.done = (job.completed + job.failed) / job.total if job.total else 1.0
        # The first counters come after the engine's first step, which on a CPU prefills
        # thousands of prompt tokens: seconds. The refined ETA is written at once then.
        counters = (progress.engine_prompt_tokens, progress.engine_completion_tokens)
        first_counters = counters != running.counters and running.counted_at is None
        if counters != running.counters:
            running.counters, running.counted_at = counters, time.monotonic()
        if first_counters or time.monotonic() - running.last_status >= STATUS_SECONDS:
            running.last_status = time.monotonic()
            self.write_running_eta(running)
            write_status(job)

    def refined(self, running: Running) -> Refined | None:
        """The running job's time left, from the tokens its engine has processed."""
        progress = running.latest
        if running.run_started is None or progress is None or running.job.estimate is None:
            return None
        if running.counted_at is None:
            return None  # nothing measured yet: the estimate before the run stands
        earlier_prompt, earlier_completion = running.earlier_tokens or (0, 0)
        return refine(
            running.job.estimate,
            time.monotonic() - running.run_started,
            earlier_prompt + progress.engine_prompt_tokens,
            earlier_completion + progress.engine_completion_tokens,
            running.job.completed + running.job.failed,
            running.job.total,
            finished_completion=progress.tally.completion_tokens,
            in_flight=progress.in_flight,
            counted=running.counted_at - running.run_started,
        )

    def running_left(self, running: Running) -> float:
        estimated = float((running.job.estimate or {}).get("run_seconds", 0.0))
        if running.run_started is None:  # still loading its model, or about to start
            loading = max(running.load_seconds - (time.monotonic() - running.started), 0.0)
            return estimated + loading
        refined = self.refined(running)
        if refined is None:
            return max(estimated - (time.monotonic() - running.run_started), 1.0)
        return refined.seconds_left

    def write_running_eta(self, running: Running) -> None:
        left = self.running_left(running)
        refined = self.refined(running)
        basis = (running.job.estimate or {}).get("basis", "no estimate")
        basis += f"; running, {round(100 * running.done)}% of requests done"
        if refined is None and running.run_started is not None:
            basis += "; no engine counters yet, the estimate before the run less the time run"
        if refined is not None:
            basis += ", refined from the tokens processed so far"
            if refined.overrun:
                basis += (
                    "; the job runs longer than estimated, so the rest is expected at its own pace"
                )
        write_eta(running.job, left, basis)

    def reap(self) -> None:
        running = self.running
        if running is None or running.thread.is_alive():
            return
        self.running = None
        job = running.job
        if running.trouble is not None:
            self.pause_for_disk(job, running.trouble)
        elif job.status.finished:
            log.info("job_finished", **job.summary())
            self.disk_failures = 0
        self.pool.touch()

    # -- cancelling ---------------------------------------------------------------------

    def cancel(self, path: Path) -> None:
        if not path.is_file():
            return  # gone, or a folder or link that merely has the name: not a cancel
        stem = path.stem
        running = self.running
        if (
            running is not None
            and running.job.sidecar_dir == path.parent
            and (running.job.stem == stem)
        ):
            running.cancel.set()
            log.info("job_cancel_requested", job=running.job.id)
            path.unlink(missing_ok=True)
            return
        job = self.queue.find(path.parent, stem)
        if job is not None:
            self.queue.remove(job)
            self.queue_changed = True
            self.eta_written.pop(job.id, None)
            if self.finish(job, JobStatus.CANCELLED):
                path.unlink(missing_ok=True)  # else kept: the cancel applies once it is back
            return
        if (path.parent / f"{stem}.jsonl").exists():
            return  # its file is still settling: the cancel applies once it is claimed
        log.warning("cancel_without_job", path=str(path))
        path.unlink(missing_ok=True)

    # -- sidecars of waiting jobs ----------------------------------------------------------

    def planned(self) -> list[tuple[int, Job, Planned]]:
        """Each queued job with its place (from 1) and when it is expected to start and end."""
        history = list(read_history(self.state))
        jobs = list(self.queue)
        running = self.running
        loaded = running.job.model if running else self.pool.model
        plans = plan_queue(
            jobs,
            {job.id: float((job.estimate or {}).get("run_seconds", 0.0)) for job in jobs},
            {job.model or "": load_seconds_for(job.model or "", history) for job in jobs},
            loaded,
            self.running_left(running) if running else None,
        )
        return [(position, job, plans[job.id]) for position, job in enumerate(jobs, start=1)]

    def estimate_queue_again(self) -> None:
        """Estimate the queued jobs again from what the history has learnt meanwhile (the
        pace of an engine just loaded); the next queue update shows the new ETAs."""
        self.pace_measured.clear()
        for job in self.queue:
            job.estimate = estimate_job(job, self.state).as_dict()
        self.queue_changed = True

    def queue_update_due(self) -> bool:
        if self.queue_pass_unfinished:
            return True
        since = time.monotonic() - self.last_queue_update
        if since < UPKEEP_RATIO * self.queue_pass_seconds:
            return False
        return since >= QUEUE_SECONDS or (self.queue_changed and since >= QUEUE_MIN_SECONDS)

    def update_queue(self) -> None:
        """Rewrite the sidecars of the queued jobs whose place or expected finish changed,
        for one slice of time; a pass left unfinished goes on at the next turn."""
        started = time.monotonic()
        if not self.queue_pass_unfinished:
            self.queue_changed = False
            self.queue_pass_seconds = 0.0
        self.queue_pass_unfinished = False
        for position, job, plan in self.planned():
            if time.monotonic() - started >= SLICE_SECONDS:
                self.queue_pass_unfinished = True
                break
            moved = job.queue_position != position
            job.queue_position = position
            if self.show_eta(job, plan, force=moved) or moved:
                write_status(job)
        self.last_queue_update = time.monotonic()
        self.queue_pass_seconds += self.last_queue_update - started
        self.status_line()

    def show_eta(self, job: Job, plan: Planned, force: bool = True) -> bool:
        """Write a queued job's `.eta` when forced, when its expected finish moved, or when it
        is due a refresh; whether it was written (its `.status` carries the same eta)."""
        finish = now() + timedelta(seconds=round(plan.finish))
        slack = max(ETA_SLACK_SECONDS, 0.02 * plan.finish)
        moved = job.eta is None or abs((finish - job.eta).total_seconds()) >= slack
        written = self.eta_written.get(job.id)
        stale = written is None or time.monotonic() - written >= ETA_REFRESH_SECONDS
        if not (force or moved or stale):
            return False
        write_eta(job, plan.finish, queue_basis(job, plan))
        self.eta_written[job.id] = time.monotonic()
        return True

    def status_line(self) -> None:
        running = self.running
        if running is None:
            text = f"idle; {len(self.queue)} queued"
        else:
            job = running.job
            text = (
                f"running {job.input_name} ({job.model}): "
                f"{job.completed + job.failed}/{job.total}; {len(self.queue)} queued"
            )
        notify(f"STATUS={text}")

    def ping(self) -> None:
        interval = watchdog_interval()
        if interval is not None and time.monotonic() - self.last_watchdog >= interval:
            self.last_watchdog = time.monotonic()
            if self.running is not None:
                self.status_line()
            notify("WATCHDOG=1")

    def sweep_status_files(self) -> None:
        """Remove final `.status` sidecars older than keep_status_hours."""
        self.last_sweep = time.monotonic()
        cutoff = now() - timedelta(hours=self.config.keep_status_hours)
        # Symlinked folders are not followed: the sweep deletes files only inside the inbox.
        subfolders = [
            path for path in self.inbox.iterdir() if path.is_dir() and not path.is_symlink()
        ]
        for folder in [self.inbox, *subfolders]:
            for path in folder.glob("*.status"):
                if is_expired(path, cutoff):
                    path.unlink(missing_ok=True)

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up every job the spool holds; the queue puts them back in their order."""
        self.remove_temporaries()
        for work in sorted((self.state / "jobs").iterdir()):
            if not (work / JOB_RECORD).is_file():
                shutil.rmtree(work, ignore_errors=True)  # claimed but never recorded: empty
                continue
            self.adopt(work)

    def remove_temporaries(self) -> None:
        """What a crash in the middle of an atomic write left: never a file of the user's,
        and never to be delivered with a job's folder."""
        folders = [self.inbox, self.state, self.outbox]
        folders += [
            path for path in self.inbox.iterdir() if path.is_dir() and not path.is_symlink()
        ]
        for work in (self.state / "jobs").iterdir():
            folders += [work, work / "out"]
        removed = sum(remove_temporaries(folder) for folder in folders if folder.is_dir())
        if removed:
            log.info("temporaries_removed", count=removed)

    def recover_job(self, job: Job) -> None:
        log.info("job_recovered", job=job.id, status=job.status.value)
        if job.status.finished or job.status is JobStatus.FINALIZING:
            final = JobStatus(job.final) if job.final else JobStatus.FAILED
            if not job.out.exists() and job.outbox:
                # Delivered before the stop, perhaps before its sidecars were final.
                mark_finished(job, final)
                shutil.rmtree(job.work, ignore_errors=True)
                return
            self.finish(job, final)
            return
        if job.status is JobStatus.CANCELLING:
            self.finish(job, JobStatus.CANCELLED)
            return
        if job.status is JobStatus.VALIDATING:
            if not (job.out / INPUT).exists():
                # Recorded, then stopped before the rename: the file is still in the inbox.
                shutil.rmtree(job.work, ignore_errors=True)
                return
            take_ticket_left_behind(job)
            revalidate(job, self.config)
            if job.errors:
                self.deliver_failed(job)
                return
        # Written before it joins the queue: a write that fails leaves it out of the queue,
        # to be adopted again, never in it twice.
        if job.status is not JobStatus.IN_PROGRESS:
            mark_queued(job)
        self.queue.push(job)


def unclaimable(path: Path) -> str | None:
    """Why a complete file cannot become a job, or None. Its name goes into status files,
    which are UTF-8 JSON."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not UTF-8 text; rename the file"
    return None


def revalidate(job: Job, config: Config) -> None:
    """Validate a job claimed before a stop, with the ticket that was claimed with it."""
    ticket_model = None
    ticket_path = find_ticket(job.out, job.stem)
    if ticket_path is not None:
        try:
            ticket = load_ticket(ticket_path)
        except TicketError as error:
            fail_job(job, "invalid_ticket", str(error))
            return
        # The claim may have stopped before its record took the ticket's values.
        job.has_ticket = True
        job.priority, job.metadata, job.defaults = ticket.priority, ticket.metadata, ticket.defaults
        ticket_model = ticket.model
    check_job(job, config, ticket_model)


def is_expired(path: Path, cutoff: datetime) -> bool:
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    if not isinstance(document, dict) or document.get("status") not in (
        "completed",
        "failed",
        "cancelled",
    ):
        return False
    finished = document.get("completed_at") or document.get("updated_at")
    try:
        return finished is not None and datetime.fromisoformat(finished) < cutoff
    except ValueError:
        return False
