"""The spool: the service's own folder of taken jobs, `state/jobs/<id>/`, and beside it
`state/runs/<id>/`, the jobs of `batchbox run` and `bench`, which the service never adopts:
a stopped run is resumed by running the same file again, never by the service.

Each job's folder holds its record (`job.json`, see `watcher.jobs.JobRecord`) and `out/`, the
folder that becomes its outbox folder: the input as it was dropped (`input.jsonl`), the
ticket, and the journal of results and errors. A folder with an input always has a record;
a record without an input means the file never left the inbox.
"""

from __future__ import annotations

import os
from pathlib import Path

from watcher.jobs import JOB_RECORD, OUT, Job, RecordError, load_job, new_job_id, now

JOBS = "jobs"
RUNS = "runs"
INPUT = "input.jsonl"
CRASHES = "crashes.json"  # in the job's spool folder, not in what is delivered
ID_ATTEMPTS = 5


def spool_folder(state: Path, spool: str = JOBS) -> Path:
    return state / spool


def new_spool_job(
    state: Path, stem: str, subdir: str = "", sidecar_dir: Path | None = None, spool: str = JOBS
) -> Job:
    """A new job with its spool folder made (and nothing in it yet).

    Job ids carry four random hex digits per second (SPEC's format), so a burst of drops
    can draw the same id twice; mkdir refuses the second, and a fresh draw fixes it.
    """
    for attempt in range(ID_ATTEMPTS):
        created = now()
        job_id = new_job_id(created)
        work = spool_folder(state, spool) / job_id
        try:
            (work / OUT).mkdir(parents=True)
        except FileExistsError:
            if attempt == ID_ATTEMPTS - 1:
                raise
            continue
        return Job(
            id=job_id,
            stem=stem,
            subdir=subdir,
            work=work,
            sidecar_dir=sidecar_dir,
            created_at=created,
        )
    raise AssertionError("unreachable")


def spool_jobs(state: Path, spool: str = JOBS) -> list[Job]:
    """The jobs the spool holds now, read from their records."""
    jobs = []
    folder = spool_folder(state, spool)
    for work in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            jobs.append(load_job(work))
        except (OSError, RecordError):
            continue  # a job being claimed or delivered right now
    return jobs


def has_record(work: Path) -> bool:
    return (work / JOB_RECORD).is_file()


def never_recorded(work: Path) -> bool:
    """A folder a claim made and a crash left before its record: neither record nor input
    (an input without a record is not ours to remove)."""
    return not os.path.lexists(work / JOB_RECORD) and not os.path.lexists(work / OUT / INPUT)
