"""One job at a time for each stem of an inbox folder.

A job's sidecars and its cancel file are named after its stem (`<stem>.status`, `.eta`,
`.cancel`), so two unfinished jobs of one stem in one folder would share them: a cancel
would hit whichever is found first, and finishing one would remove the other's `.eta`. As
with hot folders, a file whose stem belongs to an unfinished job waits in the inbox,
untouched, until that job is finished; then it is taken as usual.

A job is unfinished while its spool folder holds its record: delivery removes the folder,
so a finished job frees its stem without telling anyone, whichever thread finished it.
"""

from __future__ import annotations

from pathlib import Path

from watcher.inbox import stem_of
from watcher.jobs import Job
from watcher.spool import has_record

PRUNE_MINIMUM = 256
Key = tuple[Path, str]  # the folder a job was dropped in, and its stem


class Stems:
    """Which spool folder holds the unfinished job of each (folder, stem). Kept by the main
    loop, which alone claims and recovers jobs."""

    def __init__(self) -> None:
        self.owners: dict[Key, Path] = {}
        self.prune_at = PRUNE_MINIMUM

    def hold(self, job: Job) -> None:
        """A job taken or recovered: its stem is its own until it is finished."""
        if job.sidecar_dir is not None:
            self._hold((job.sidecar_dir, job.stem), job.work)

    def hold_path(self, path: Path, work: Path) -> None:
        """A file taken into `work` whose claim was cut short before its job was known."""
        self._hold((path.parent, stem_of(path.name)), work)

    def _hold(self, key: Key, work: Path) -> None:
        self.owners[key] = work
        if len(self.owners) >= self.prune_at:
            # Finished jobs are forgotten only when asked about; now and then the rest are,
            # so the map stays as large as the unfinished jobs (amortised: one look per hold).
            for stale in [key for key, held in self.owners.items() if not has_record(held)]:
                del self.owners[stale]
            self.prune_at = max(PRUNE_MINIMUM, 2 * len(self.owners))

    def owner(self, folder: Path, stem: str) -> Path | None:
        """The spool folder of the unfinished job of that stem, if there is one."""
        key = (folder, stem)
        work = self.owners.get(key)
        if work is None:
            return None
        if not has_record(work):
            del self.owners[key]  # finished (delivered or set aside) since
            return None
        return work

    def owner_of_file(self, path: Path) -> Path | None:
        return self.owner(path.parent, stem_of(path.name))

    def key_of(self, work: Path) -> Key | None:
        return next((key for key, held in self.owners.items() if held == work), None)
