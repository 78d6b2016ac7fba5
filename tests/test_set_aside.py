"""A bad job never stops the service: a spool folder that cannot be recovered or delivered
(an unreadable record, an input gone while finishing) is set aside in `state/broken/` with
its reason, its `.status` says it failed where it can, the other jobs run, and the next
start does not meet it again."""

from __future__ import annotations

import shutil
from pathlib import Path

from servicekit import (
    chat_file,
    delivered,
    drop,
    finished,
    read_json,
    start_service,
    stop_service,
    write_config,
)
from structlog.testing import capture_logs

from watcher.claim import claim_and_validate
from watcher.config import load_config
from watcher.jobs import JobStatus, mark_finalizing, mark_queued


def test_jobs_that_cannot_be_recovered_are_set_aside_and_the_others_run(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    inbox, outbox, state = (config.folder(name) for name in ("inbox", "outbox", "state"))
    jobs = {}
    for sequence, stem in enumerate(("gone", "folder", "garbage", "good")):
        path = drop(inbox, f"{stem}.jsonl", chat_file(2, prefix=stem))
        jobs[stem] = claim_and_validate(path, config, sequence)
        mark_queued(jobs[stem])
    mark_finalizing(jobs["gone"], JobStatus.COMPLETED)
    (jobs["gone"].out / "input.jsonl").unlink()  # removed by hand while it was finishing
    record = jobs["folder"].work / "job.json"
    record.unlink()
    record.mkdir()
    (jobs["garbage"].work / "job.json").write_bytes(b"\x00 not a record")

    with capture_logs() as logs:
        harness = start_service(tmp_path)  # used to raise, so systemd restarted it in a loop
        try:
            harness.run_until(lambda: finished(inbox / "good.status", outbox), 30)
        finally:
            stop_service(harness)
    assert sorted(delivered(outbox / "good").custom_ids) == ["good0", "good1"]
    broken = state / "broken"
    assert sorted(path.name for path in broken.iterdir()) == sorted(
        jobs[stem].id for stem in ("gone", "folder", "garbage")
    )
    for stem in ("folder", "garbage"):  # their inputs are kept, never removed
        assert (broken / jobs[stem].id / "out" / "input.jsonl").read_bytes() == chat_file(
            2, prefix=stem
        )
    reason = (broken / jobs["folder"].id / "reason.txt").read_text()
    assert "record" in reason
    status = read_json(inbox / "gone.status")
    assert status["status"] == "failed" and status["outbox"] is None
    assert status["errors"][-1]["code"] == "job_not_finished"
    assert str(broken / jobs["gone"].id) in status["errors"][-1]["message"]
    set_aside = [entry for entry in logs if entry["event"] == "job_set_aside"]
    assert len(set_aside) == 3, logs

    # The next start meets none of them again.
    with capture_logs() as logs:
        harness = start_service(tmp_path)
        stop_service(harness)
    assert not [entry for entry in logs if entry["event"] in ("job_set_aside", "job_recovered")]
    assert not any((state / "jobs").iterdir())
    shutil.rmtree(broken)
