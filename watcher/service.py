"""`batchbox serve`: the main loop of the appliance, which only wires the steps of the flow.

An inbox event or rescan names a candidate (`watcher.inbox`); settling decides it is
complete (`watcher.settle`); claiming renames it into the spool (`watcher.claim`, driven by
`watcher.intake`); validation counts and checks it (`watcher.validate`) and the estimator
writes the ETA (`watcher.etas`); the queue (`watcher.jobqueue`) hands it to the engine
process (`watcher.worker`, `watcher.engines`); the runner turns lines into results
(`watcher.execute`, `runner.run`); delivery renames a finished folder into the outbox and
records the benchmark (`watcher.deliver`).

The main loop does everything except running a job, which happens on one worker thread
(the engine itself is in a child process), so events, cancels, sidecars and the systemd
watchdog are served while a job runs.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import structlog

from benchmarks.record import History, knows_pace
from runner.durable import is_disk_trouble
from runner.run import Progress
from watcher.aside import set_aside
from watcher.config import Config
from watcher.deliver import deliver_job
from watcher.diskwait import DiskWait
from watcher.engines import EngineKeeper
from watcher.errors import StartError
from watcher.estimates import (
    compact_history,
    estimate_job,
    expected_load,
    expected_load_seconds,
)
from watcher.etas import QueueEtas, write_running_eta
from watcher.inbox import Candidate, start_observer
from watcher.inboxnames import is_regular, make_model_folders, remove_file
from watcher.intake import Intake
from watcher.jobqueue import JobQueue
from watcher.jobs import Job, JobStatus, mark_queued, write_status
from watcher.machine import one_filesystem_problem
from watcher.notify import notify, watchdog_interval
from watcher.recovery import recover_folder, remove_temporaries
from watcher.sidecars import sweep_status_files
from watcher.spool import has_record, never_recorded, spool_folder
from watcher.worker import Running, start_job

log = structlog.get_logger()

# A running job's sidecars are rewritten every `status_seconds` (config), and first this
# long after it starts: a job done sooner goes from in_progress to its end without sidecars
# in between, which in a burst of small files would be most of the writes.
FIRST_STATUS_SECONDS = 0.5
SWEEP_SECONDS = 60.0
# Shares of stop_timeout_seconds, from the stop being asked for: until then a claim may
# finish its file; until then the running job may stop by itself; until then the engine may
# close by itself; it is killed after that.
STOP_CLAIM_SHARE = 0.1
STOP_JOB_SHARE = 0.6
STOP_ENGINE_SHARE = 0.9


class Service:
    def __init__(self, config: Config, engines: EngineKeeper | None = None) -> None:
        self.config = config
        self.inbox = config.folder("inbox")
        self.outbox = config.folder("outbox")
        self.state = config.folder("state")
        self.engines = engines or EngineKeeper()
        # A model the history knows nothing of has its engine's pace timed at its load;
        # then every job waiting for it is estimated again.
        self.engines.wants_pace = lambda spec: not knows_pace(
            self.state, spec.alias, spec.engine_kind
        )
        self.pace_measured = threading.Event()
        self.disk = DiskWait(self.state, config.min_free_bytes)
        self.intake = Intake(config, self.disk, self.take_job, self.cancel)
        self.queue = JobQueue()
        self.history = History(self.state)
        self.etas = QueueEtas(self.history)
        self.running: Running | None = None
        self.stopping = threading.Event()
        self.stop_asked: float | None = None
        self.observer = None
        self.last_sweep = 0.0
        self.last_watchdog = 0.0

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> None:
        problem = one_filesystem_problem(self.config)
        if problem:
            raise StartError(problem)
        make_model_folders(self.inbox, list(self.config.models))
        spool_folder(self.state).mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)
        compact_history(self.history, force=True)
        self.recover()
        self.observer = start_observer(
            self.inbox, self.intake.events.put, polling=self.config.observer == "polling"
        )
        self.intake.rescan()
        notify("READY=1")
        log.info("service_ready", inbox=str(self.inbox), queued=len(self.queue))

    def stop(self) -> None:
        """Ask the loop to stop; safe from any thread, and from a signal handler."""
        self.stop_asked = self.stop_asked or time.monotonic()
        self.stopping.set()

    def shutdown(self) -> None:
        """Stop the running job where it is (it resumes at the next start) and the engine,
        within stop_timeout_seconds of the stop being asked for. A model load is abandoned
        (the job sees the stop within half a second); a job that is still delivering when its
        share is up finishes at the next start, as after a crash."""
        notify("STOPPING=1")
        self.stop()
        asked = self.stop_asked or time.monotonic()

        def left(share: float) -> float:
            end = asked + share * self.config.stop_timeout_seconds
            return max(end - time.monotonic(), 0.0)

        self.intake.stop_claiming(left(STOP_CLAIM_SHARE))
        if self.running is not None:
            self.running.thread.join(left(STOP_JOB_SHARE))
            self.collect_finished_job()
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(min(left(STOP_ENGINE_SHARE), 2.0))
        self.engines.close(timeout=left(STOP_ENGINE_SHARE))
        log.info("service_stopped", seconds=round(time.monotonic() - asked, 2))

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.is_set():
                self.tick()
                self.wait()
        finally:
            self.shutdown()

    def wait(self) -> None:
        """Until an event comes in (a drop, a finished job) or a fifth of a second passes."""
        try:
            candidate = self.intake.events.get(timeout=0.2)
        except queue.Empty:
            return
        self.intake.events.put(candidate)

    # -- one turn of the loop -----------------------------------------------------------

    def tick(self) -> None:
        """One turn of the loop. An error of the disk (or of a folder) never ends the
        service: every job it touched is in the spool, from where it is picked up again."""
        try:
            self.advance()
        except OSError as error:
            if is_disk_trouble(error):
                self.disk.trouble(error)
            else:
                log.exception("tick_failed", error=str(error))
        finally:
            self.ping()

    def advance(self) -> None:
        """Move every part of the flow on by what is due now."""
        self.intake.take_events()
        self.intake.rescan_if_due()
        self.intake.settle()
        self.intake.claim_ready(self.stopping.is_set)
        self.collect_finished_job()
        if self.disk.unwritten_notes:
            self.disk.write_notes()
        if self.disk.waiting_jobs and self.disk.ready():
            self.recover_waiting_jobs()
        if self.running is None and not self.stopping.is_set() and self.disk.ready():
            self.start_next()
        if self.pace_measured.is_set():
            self.pace_measured.clear()
            self.etas.estimate_again(self.queue)
        if self.etas.update_due():
            self.etas.update(self.queue, self.running, self.engines.model, self.job_ended)
            self.status_line()
        if self.running is None and len(self.queue) == 0:
            self.engines.unload_if_idle(self.config.idle_unload_seconds)
        if time.monotonic() - self.last_sweep >= SWEEP_SECONDS:
            self.last_sweep = time.monotonic()
            sweep_status_files(self.inbox, self.config.keep_status_hours)

    # -- jobs in and out ----------------------------------------------------------------

    def take_job(self, job: Job, path: Path) -> None:
        """A job just claimed: delivered at once when it cannot run, else queued."""
        if job.errors:
            self.finish(job, JobStatus.FAILED)
            return
        self.enqueue(job)
        cancel = path.with_name(f"{job.stem}.cancel")
        if cancel.exists():
            self.cancel(cancel)  # dropped while the file was still settling

    def enqueue(self, job: Job) -> None:
        """Queue a validated job: its `.eta` and `.status` say where it stands at once; the
        jobs it overtook learn their new places at the next queue update."""
        job.estimate = estimate_job(job, self.history).as_dict()
        self.queue.push(job)
        self.etas.place_new(job, self.queue, self.running, self.engines.model)
        mark_queued(job)

    def finish(self, job: Job, final: JobStatus) -> bool:
        """Deliver a job that is not running; on a disk error it is picked up again later.
        One that cannot be delivered otherwise is set aside (watcher.aside)."""
        try:
            deliver_job(job, self.config, self.outbox, final)
        except OSError as error:
            if not is_disk_trouble(error):
                return self.set_aside(job, error)
            log.warning("job_not_delivered", job=job.id, error=str(error))
            self.disk.wait_with(job.work)
            self.disk.trouble(error)
            return False
        except Exception as error:  # noqa: BLE001 - one bad job must not stop the service
            return self.set_aside(job, error)
        log.info("job_finished", **job.summary())
        self.disk.succeeded()
        return True

    def set_aside(self, job: Job, error: Exception) -> bool:
        log.error("job_not_delivered", job=job.id, exc_info=error)
        set_aside(job.work, self.state, f"it could not be delivered ({error})", job)
        return True

    def cancel(self, path: Path) -> None:
        if not is_regular(path, "cancel file"):
            return  # gone, or a folder, link or FIFO that merely has the name: not a cancel
        stem = path.stem
        running = self.running
        if running is not None and running.job.sidecar_dir == path.parent and (
            running.job.stem == stem
        ):
            running.cancel.set()
            log.info("job_cancel_requested", job=running.job.id)
            remove_file(path, "cancel file")
            return
        job = self.queue.find(path.parent, stem)
        if job is not None:
            self.queue.remove(job)
            self.etas.forget(job)
            if self.finish(job, JobStatus.CANCELLED):
                remove_file(path, "cancel file")  # else kept: it applies once the job is back
            return
        if self.intake.stems.owner(path.parent, stem) is not None:
            log.info("job_cancel_waits", path=str(path))
            return  # its job waits for the disk: the cancel applies once it is back
        if (path.parent / f"{stem}.jsonl").exists() or self.intake.claiming(path.parent, stem):
            return  # its file is still settling or being taken: the cancel applies after
        log.warning("cancel_without_job", path=str(path))
        remove_file(path, "cancel file")

    # -- the running job ----------------------------------------------------------------

    def start_next(self) -> None:
        job = self.queue.pop()
        if job is None:
            return
        self.etas.forget(job)
        running = Running(job=job)
        if self.engines.model != job.model:
            running.load_seconds = expected_load_seconds(job.model or "", self.history)
        self.running = running
        start_job(
            running,
            self.config,
            self.engines,
            self.outbox,
            self.progress,
            self.stopping,
            lambda: self.intake.events.put(Candidate(self.inbox, "job-finished")),
            on_pace=lambda job: self.pace_measured.set(),
            on_loading=self.loading,
        )

    def progress(self, running: Running, progress: Progress) -> None:
        # The first progress after a load of its model: the load is over, said at once.
        loaded = running.run_started is None and running.loading_began is not None
        running.note_progress(progress)
        # Written at once when a load is over (the sidecars said "loading"), and when the
        # engine's counters first move (the first refined ETA); else FIRST_STATUS_SECONDS
        # after the start, so that a job done sooner writes nothing in between, and then
        # every `status_seconds`.
        first_counters = running.counters_moved(progress)
        since_start = time.monotonic() - running.started
        if running.last_status:
            due = time.monotonic() - running.last_status >= self.config.status_seconds
        else:
            due = since_start >= FIRST_STATUS_SECONDS
        if loaded or due or (first_counters and since_start >= FIRST_STATUS_SECONDS):
            running.last_status = time.monotonic()
            write_running_eta(running)
            write_status(running.job)

    def loading(self, running: Running, began: float) -> None:
        """The running job's model loads (on the worker thread): its sidecars say so when the
        load begins and at least every `status_seconds`, the `.eta` counting the rest of it."""
        if running.note_loading(began):
            model = running.job.model or ""
            running.load_seconds, running.load_basis = expected_load(model, self.history)
            running.last_status = 0.0
        if time.monotonic() - running.last_status >= self.config.status_seconds:
            running.last_status = time.monotonic()
            write_running_eta(running)
            write_status(running.job)

    def job_ended(self) -> bool:
        """Whether the running job has ended, so that the next one waits to be started."""
        return self.running is not None and self.running.ended.is_set()

    def collect_finished_job(self) -> None:
        running = self.running
        if running is None or not running.ended.is_set():
            return
        running.thread.join()  # returning from its last call: the end woke this loop
        self.running = None
        job = running.job
        if running.trouble is not None:
            self.disk.pause_job(job, running.trouble)
        elif job.status.finished:
            log.info("job_finished", **job.summary())
            self.disk.succeeded()
            compact_history(self.history, force=False)
        self.engines.touch()

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up every job the spool holds; the queue puts them back in their order."""
        remove_temporaries(self.inbox, self.state, self.outbox)
        for work in sorted(spool_folder(self.state).iterdir()):
            if never_recorded(work):
                shutil.rmtree(work, ignore_errors=True)  # claimed but never recorded: empty
                continue
            self.recover_one(work)

    def recover_waiting_jobs(self) -> None:
        """Pick up, from their spool records, the jobs a disk error cut short; a cancel
        dropped while they waited applies now."""
        folders = self.disk.take_waiting()
        for index, work in enumerate(folders):
            if not self.recover_folder(work):
                for later in folders[index + 1 :]:
                    self.disk.wait_with(later)  # the disk failed again: the rest wait with it
                return
            key = self.intake.stems.key_of(work)
            if key is not None and is_regular(key[0] / f"{key[1]}.cancel", "cancel file"):
                self.cancel(key[0] / f"{key[1]}.cancel")

    def recover_folder(self, work: Path) -> bool:
        """Recover one spool folder into the queue (or the outbox); False on a disk error."""
        if not has_record(work):
            return True  # delivered meanwhile, or never recorded
        return self.recover_one(work)

    def recover_one(self, work: Path) -> bool:
        return recover_folder(
            work, self.config, self.queue, self.finish, self.disk, self.intake.stems.hold
        )

    # -- systemd ------------------------------------------------------------------------

    def status_line(self) -> None:
        running = self.running
        settling = len(self.intake.settler.pending())
        waiting = f"{len(self.queue)} queued" + (f", {settling} settling" if settling else "")
        if running is None:
            text = f"idle; {waiting}"
        elif running.job.loading_since is not None:
            text = f"loading {running.job.model} for {running.job.input_name}; {waiting}"
        else:
            job = running.job
            text = (
                f"running {job.input_name} ({job.model}): "
                f"{job.completed + job.failed}/{job.total}; {waiting}"
            )
        notify(f"STATUS={text}")

    def ping(self) -> None:
        interval = watchdog_interval()
        if interval is not None and time.monotonic() - self.last_watchdog >= interval:
            self.last_watchdog = time.monotonic()
            if self.running is not None:
                self.status_line()
            notify("WATCHDOG=1")
