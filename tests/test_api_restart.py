"""`batchbox api` killed with SIGKILL and started again: nothing lost, nothing half made, and
every batch made before still listed and retrievable."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import openai
from apikit import SLOW, Appliance, appliance, chat_requests, finish, leftovers, outputs, poll
from servicekit import batchbox, read_json, wait_for

CHAT = "/v1/chat/completions"


def upload(client: openai.OpenAI, data: bytes) -> str:
    return client.files.create(file=("requests.jsonl", io.BytesIO(data)), purpose="batch").id


def create(client: openai.OpenAI, file_id: str) -> str:
    return client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id


def assert_each_line_once(client: openai.OpenAI, batch, count: int, prefix: str = "q") -> None:
    results, errors = outputs(client, batch)
    seen = Counter(record["custom_id"] for record in results + errors)
    assert sorted(seen) == sorted(f"{prefix}{index}" for index in range(count))
    assert set(seen.values()) == {1}


def test_kill_9_mid_upload_leaves_nothing_and_loses_nothing(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        file_id = upload(client, chat_requests(4))
        batch_id = create(client, file_id)
        assert finish(client, batch_id).status == "completed"
        files_before = sorted(item.id for item in client.files.list())

        address = urlsplit(site.origin)
        connection = socket.create_connection((address.hostname, address.port), timeout=60)
        connection.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key()}\r\n"
            "Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 3000000\r\n\r\n"
            '--zz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'.encode()
            + b"\r\n"
            + b"z" * 1_500_000
        )
        wait_for(
            lambda: any(path.name == "content" for path in (site.state / "tmp").rglob("*")),
            30,
            "the upload to be on its way in",
        )
        site.api.kill()  # SIGKILL, mid-upload
        connection.close()
        assert leftovers(site)  # what the crash left...

        site.start_api()
        assert leftovers(site) == []  # ...is gone once it is back
        client = site.client()
        assert sorted(item.id for item in client.files.list()) == files_before
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "completed"
        assert_each_line_once(client, batch, 4)
        assert [path.name for path in site.inbox.iterdir() if path.name.startswith(".")] == []


def test_kill_9_mid_poll_loses_no_batch(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True, engine=SLOW) as site:
        client = site.client()
        batch_id = create(client, upload(client, chat_requests(30)))
        poll(
            lambda: client.batches.retrieve(batch_id),
            lambda batch: batch.status == "in_progress" and batch.request_counts.completed > 0,
            60,
            "the batch to run",
        )
        polls, stopped = [], threading.Event()

        def keep_polling() -> None:
            while not stopped.is_set():
                try:
                    polls.append(client.batches.retrieve(batch_id).request_counts.completed)
                except openai.APIConnectionError:
                    return  # the API is gone

        poller = threading.Thread(target=keep_polling, daemon=True)
        poller.start()
        wait_for(lambda: len(polls) >= 3, 30, "a few polls")
        site.api.kill()  # SIGKILL, while the client polls
        poller.join(60)
        stopped.set()

        site.start_api()
        client = site.client()
        assert [batch.id for batch in client.batches.list()] == [batch_id]
        batch = finish(client, batch_id)
        assert batch.status == "completed"
        assert batch.request_counts.completed == 30
        assert_each_line_once(client, batch, 30)


def test_a_creation_cut_short_is_undone_or_kept_at_the_next_start(tmp_path: Path) -> None:
    """The on-disk states a SIGKILL inside `POST /v1/batches` can leave: the record written
    and the ticket placed but not the data (undone: its client never got an answer), or the
    data placed but the record not yet marked so (kept: the batch is in the inbox)."""
    with appliance(tmp_path) as site:
        client = site.client()
        file_id = upload(client, chat_requests(2))
        kept = create(client, file_id)
        site.api.kill()

        record = read_json(site.state / "batches" / f"{kept}.json")
        undone = "batch_" + "0" * 11 + "1" + "a" * 12
        (site.state / "batches" / f"{undone}.json").write_text(
            json.dumps(record | {"id": undone, "placed": False})
        )
        (site.inbox / f"api-{undone}.yaml").write_text("metadata: {}\n")
        (site.state / "batches" / f"{kept}.json").write_text(json.dumps(record | {"placed": False}))
        stray = site.inbox / f".api-{undone}.0123abcd.tmp"
        stray.write_text("half a copy")

        site.start_api()
        client = site.client()
        assert [batch.id for batch in client.batches.list()] == [kept]
        assert client.batches.retrieve(kept).status == "validating"
        assert not (site.inbox / f"api-{undone}.yaml").exists()
        assert not (site.state / "batches" / f"{undone}.json").exists()
        assert read_json(site.state / "batches" / f"{kept}.json")["placed"] is True
        assert not stray.exists()


def finished_in_inbox(site: Appliance, batch_id: str) -> bool:
    try:
        return read_json(site.inbox / f"api-{batch_id}.status")["status"] == "completed"
    except (FileNotFoundError, ValueError):
        return False


def test_a_batch_whose_status_was_swept_while_the_api_was_down_is_found_in_the_outbox(
    tmp_path: Path,
) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        batch_id = create(client, upload(client, chat_requests(3)))
        wait_for(lambda: finished_in_inbox(site, batch_id), 60, "the batch to finish")
        site.api.kill()
        (site.inbox / f"api-{batch_id}.status").unlink()  # as keep_status_hours would
        site.start_api()
        client = site.client()
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "completed" and batch.output_file_id
        assert_each_line_once(client, batch, 3)


def test_a_batch_with_no_trace_left_is_expired(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        batch_id = create(client, upload(client, chat_requests(2)))
        wait_for(lambda: finished_in_inbox(site, batch_id), 60, "the batch to finish")
        site.api.kill()
        folder = read_json(site.inbox / f"api-{batch_id}.status")["outbox"]
        (site.inbox / f"api-{batch_id}.status").unlink()
        shutil.rmtree(site.outbox / folder)
        path = site.state / "batches" / f"{batch_id}.json"
        record = read_json(path)
        path.write_text(json.dumps(record | {"created_at": record["created_at"] - 3 * 86400}))
        site.start_api()
        batch = site.client().batches.retrieve(batch_id)
        assert batch.status == "expired" and batch.expired_at is not None


def test_a_second_api_on_the_same_state_folder_exits_naming_the_first(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        second = batchbox(site.config_path, "api")
        assert second.returncode == 1
        assert "another batchbox api" in second.stderr and "api.lock" in second.stderr
        assert site.client().models.list().data  # the first one serves on


def test_output_files_half_registered_by_a_crash_are_tidied_at_the_next_start(
    tmp_path: Path,
) -> None:
    """Output files are registered before their batch's record names them: a SIGKILL in
    between leaves files that no batch names (and, a moment earlier, a folder without its
    record). The next start removes both and keeps the batch's own."""
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        batch = finish(client, create(client, upload(client, chat_requests(2))))
        site.api.kill()
        files = site.state / "files"
        orphan = "file-" + "0" * 11 + "1" + "b" * 12
        (files / orphan).mkdir()
        record = read_json(files / batch.output_file_id / "record.json")
        (files / orphan / "record.json").write_text(json.dumps(record | {"id": orphan}))
        bare = "file-" + "0" * 11 + "1" + "c" * 12
        (files / bare).mkdir()

        site.start_api()
        client = site.client()
        assert not (files / orphan).exists() and not (files / bare).exists()
        assert {item.id for item in client.files.list(purpose="batch_output")} == {
            batch.output_file_id
        }
        assert_each_line_once(client, client.batches.retrieve(batch.id), 2)
