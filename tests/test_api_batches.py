"""The official `openai` SDK, with strict response validation, against a live `batchbox api`
and `batchbox serve` (fake engine): batches from upload to output files, lists, cancels, and
each error status raising the SDK's own exception class."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from apikit import (
    SLOW,
    Appliance,
    appliance,
    chat_requests,
    finish,
    outputs,
    poll,
)
from servicekit import chat_line, jsonl, read_json

CHAT = "/v1/chat/completions"


def upload(client: openai.OpenAI, data: bytes, name: str = "requests.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def create(client: openai.OpenAI, file_id: str, **options) -> openai.types.Batch:
    return client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", **options
    )


def test_a_batch_runs_from_upload_to_its_output_and_error_files(tmp_path: Path) -> None:
    requests = [chat_line(f"q{index}", f"question {index}") for index in range(6)]
    data = jsonl(requests[:3]) + b"this line is not JSON\n" + jsonl(requests[3:])
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        file_id = upload(client, data)
        assert client.files.retrieve(file_id).bytes == len(data)
        batch = create(client, file_id, metadata={"project": "demo"})
        assert batch.status == "validating" and batch.metadata == {"project": "demo"}

        batch = finish(client, batch.id)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 7, "completed": 6, "failed": 1}
        assert batch.model == "fake"
        assert batch.usage is not None and batch.usage.output_tokens > 0
        assert batch.in_progress_at and batch.completed_at and batch.finalizing_at
        assert batch.created_at <= batch.in_progress_at <= batch.completed_at

        results, errors = outputs(client, batch)
        # every input line once across the two files: results by custom_id, the bad line by
        # its line number
        assert sorted(record["custom_id"] for record in results) == [f"q{i}" for i in range(6)]
        assert [(record["custom_id"], record["error"]["line"]) for record in errors] == [(None, 4)]
        assert all(record["response"]["body"]["object"] == "chat.completion" for record in results)

        # the files are the outbox folder's, byte for byte, and belong to this key
        status = read_json(site.inbox / f"api-{batch.id}.status")
        folder = site.outbox / status["outbox"]
        assert (
            client.files.content(batch.output_file_id).content
            == (folder / "results.jsonl").read_bytes()
        )
        output = client.files.retrieve(batch.output_file_id)
        assert output.purpose == "batch_output" and output.bytes > 0
        # every field of the SDK's types is in the JSON, null where unset (the SDK would
        # accept a missing one silently)
        raw_batch = client.batches.with_raw_response.retrieve(batch.id).http_response.json()
        assert set(raw_batch) == set(openai.types.Batch.model_fields)
        raw_file = client.files.with_raw_response.retrieve(output.id).http_response.json()
        assert set(raw_file) == set(openai.types.FileObject.model_fields)
        # the metadata went in with the ticket, as for a dropped file
        assert status["metadata"] == {"project": "demo"}
        assert (folder / f"api-{batch.id}.yaml").is_file()


def test_routing_follows_the_lines_model_else_the_default(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        named = create(client, upload(client, chat_requests(3, model="other")))
        unnamed = create(client, upload(client, chat_requests(3)))
        assert finish(client, named.id).model == "other"
        assert finish(client, unnamed.id).model == "fake"


def test_a_file_with_no_valid_line_fails_with_its_errors(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        batch = finish(client, create(client, upload(client, b'[1, 2]\n"text"\n')).id)
        assert batch.status == "failed"
        assert batch.failed_at is not None and batch.completed_at is None
        assert batch.errors is not None and batch.errors.object == "list"
        assert batch.errors.data and all(error.message for error in batch.errors.data)
        results, errors = outputs(client, batch)
        assert results == [] and len(errors) == 2


def test_batches_list_in_pages_newest_first(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:  # no service: the batches wait in the inbox
        client = site.client()
        file_id = upload(client, chat_requests(2))
        made = [create(client, file_id).id for _ in range(5)]
        newest_first = made[::-1]

        page = client.batches.list(limit=2)
        assert [batch.id for batch in page.data] == newest_first[:2]
        assert page.has_more is True
        assert page.first_id == newest_first[0] and page.last_id == newest_first[1]
        last = client.batches.list(limit=2, after=newest_first[3])
        assert [batch.id for batch in last.data] == newest_first[4:] and last.has_more is False

        # the SDK's auto-paging walks every page
        assert [batch.id for batch in client.batches.list(limit=2)] == newest_first
        assert all(batch.status == "validating" for batch in client.batches.list(limit=100))

        # another key sees none of them
        other = site.client("bob")
        assert list(other.batches.list()) == []


def test_files_list_in_pages_and_by_purpose(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        client = site.client()
        made = [upload(client, chat_requests(1), f"f{index}.jsonl") for index in range(3)]
        assert [item.id for item in client.files.list(limit=2)] == made[::-1]
        assert [item.id for item in client.files.list(order="asc")] == made
        page = client.files.list(limit=2, order="asc")
        assert [item.id for item in page.data] == made[:2] and page.has_more
        assert list(client.files.list(purpose="batch_output")) == []


def wait_for_state(site: Appliance, batch_id: str, state: str) -> dict:
    """The batch's `.status` sidecar in the inbox, once it says `state`."""
    path = site.inbox / f"api-{batch_id}.status"

    def read() -> dict | None:
        try:
            return read_json(path)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    return poll(read, lambda document: bool(document) and document["status"] == state, 60, state)


def test_cancelling_a_queued_and_a_running_batch(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True, engine=SLOW) as site:
        client = site.client()
        running = create(client, upload(client, chat_requests(200, "r")))
        poll(
            lambda: client.batches.retrieve(running.id),
            lambda batch: batch.status == "in_progress" and batch.request_counts.completed >= 2,
            60,
            "the first batch to be running",
        )
        queued = create(client, upload(client, chat_requests(5, "w")))
        wait_for_state(site, queued.id, "queued")
        assert client.batches.retrieve(queued.id).status == "in_progress"  # OpenAI has no queue

        cancelling = client.batches.cancel(queued.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        queued = finish(client, queued.id)
        assert queued.status == "cancelled" and queued.cancelled_at is not None
        results, errors = outputs(client, queued)
        assert results == []
        assert sorted(record["custom_id"] for record in errors) == [f"w{i}" for i in range(5)]
        assert {record["error"]["code"] for record in errors} == {"batch_cancelled"}

        assert client.batches.cancel(running.id).status == "cancelling"
        running = finish(client, running.id)
        assert running.status == "cancelled"
        results, errors = outputs(client, running)
        custom_ids = Counter(record["custom_id"] for record in results + errors)
        assert sorted(custom_ids) == sorted(f"r{i}" for i in range(200))
        assert set(custom_ids.values()) == {1}
        assert results and errors  # some ran before the cancel, the rest did not

        with pytest.raises(openai.ConflictError) as raised:
            client.batches.cancel(running.id)
        assert raised.value.status_code == 409
        assert raised.value.body["code"] == "batch_finished"


def test_each_error_raises_the_sdks_own_exception(tmp_path: Path) -> None:
    with appliance(tmp_path, limits={"max_file_bytes": 10_000}) as site:
        client = site.client()
        file_id = upload(client, chat_requests(2))
        batch = create(client, file_id)

        with pytest.raises(openai.AuthenticationError):
            site.client().with_options(api_key="bb-not-a-key").models.list()
        response = httpx.get(f"{site.base_url}/models")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_" + "0" * 24)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("not-an-id")
        other = site.client("bob")  # someone else's objects are unknown, not forbidden
        for call in (
            lambda: other.batches.retrieve(batch.id),
            lambda: other.batches.cancel(batch.id),
            lambda: other.files.retrieve(file_id),
            lambda: other.files.content(file_id),
            lambda: other.files.delete(file_id),
            lambda: create(other, file_id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()

        for options, param in (
            ({"completion_window": "1h"}, "completion_window"),
            ({"endpoint": "/v1/responses"}, "endpoint"),
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ):
            arguments = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            with pytest.raises(openai.BadRequestError) as raised:
                client.batches.create(**(arguments | options))
            assert raised.value.body["param"] == param
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
        response = httpx.post(  # not JSON at all: a 400, never a 422
            f"{site.base_url}/batches",
            headers={"Authorization": f"Bearer {site.key()}", "Content-Type": "application/json"},
            content=b"{not json",
        )
        assert response.status_code == 400

        with pytest.raises(openai.APIStatusError) as raised:
            client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 20_000)), purpose="batch")
        assert raised.value.status_code == 413

        # nothing of the refused requests was kept
        assert [item.id for item in client.files.list()] == [file_id]
        assert [item.id for item in client.batches.list()] == [batch.id]


def test_a_finished_batch_cannot_be_cancelled(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True) as site:
        client = site.client()
        batch = finish(client, create(client, upload(client, chat_requests(2))).id)
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)


def test_over_the_rate_limit_a_key_gets_429_with_retry_after(tmp_path: Path) -> None:
    with appliance(tmp_path, api={"burst": 3, "requests_per_second": 0.01}) as site:
        client = site.client()
        for _ in range(3):
            client.models.list()
        with pytest.raises(openai.RateLimitError) as raised:
            client.models.list()
        assert int(raised.value.response.headers["retry-after"]) >= 1
        # each key has an allowance of its own
        assert len(site.client("bob").models.list().data) == 3


def test_models_are_the_configured_aliases(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        client = site.client()
        assert sorted(model.id for model in client.models.list()) == ["embedder", "fake", "other"]
        assert client.models.retrieve("other").owned_by == "batchbox"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4o")


def test_unknown_routes_and_bad_bodies_answer_in_openais_shape(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        headers = {"Authorization": f"Bearer {site.key()}"}
        for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/responses"), ("GET", "/x")):
            response = httpx.request(method, site.origin + path, headers=headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "unknown_url"
        response = httpx.post(f"{site.base_url}/batches", headers=headers, json={"endpoint": CHAT})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "input_file_id"
        response = httpx.post(f"{site.base_url}/batches", headers=headers, json=[1, 2])
        assert response.status_code == 400
        response = httpx.get(f"{site.base_url}/batches?limit=1000", headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] == "limit"
        response = httpx.get(f"{site.base_url}/batches?after=../../x", headers=headers)
        assert response.status_code == 400
        # a body over max_body_bytes, declared or not
        big = {"input_file_id": "x" * (2 << 20), "endpoint": CHAT, "completion_window": "24h"}
        response = httpx.post(f"{site.base_url}/batches", headers=headers, json=big)
        assert response.status_code == 413

        def chunks():
            yield json.dumps(big).encode()

        response = httpx.post(f"{site.base_url}/batches", headers=headers, content=chunks())
        assert response.status_code == 413


def test_the_batch_data_is_a_hard_link_and_outlives_the_deleted_upload(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:  # the service starts later
        client = site.client()
        file_id = upload(client, chat_requests(4))
        batch = create(client, file_id)
        placed = site.inbox / f"api-{batch.id}.jsonl"
        kept = site.state / "files" / file_id / "content"
        assert placed.stat().st_ino == kept.stat().st_ino  # one inode: no copy was made
        client.files.delete(file_id)  # OpenAI allows it; the batch keeps its data
        assert not kept.exists() and placed.is_file()
        site.start_serve()
        batch = finish(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 4


def test_a_forged_status_in_the_inbox_breaks_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    """Anyone who can write to the share can write a `.status` for an API batch; the API
    still answers in the SDK's types, and follows no path the document names."""
    with appliance(tmp_path) as site:
        client = site.client()
        batch = create(client, upload(client, chat_requests(2)))
        sidecar = site.inbox / f"api-{batch.id}.status"
        forged = {
            "input": f"api-{batch.id}.jsonl",
            "status": ["in_progress"],
            "request_counts": {"total": "many", "completed": -3, "failed": True},
            "usage": "lots",
            "errors": "none",
            "model": 5,
            "queue_position": "first",
            "eta": "2020-01-01T00:00:00",
            "throughput": [1],
        }
        sidecar.write_text(json.dumps(forged))
        seen = client.batches.retrieve(batch.id)  # strict validation: every type as declared
        assert seen.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
        assert seen.model is None

        sidecar.write_text(json.dumps(forged | {"status": "completed", "outbox": "../state/api"}))
        seen = client.batches.retrieve(batch.id)
        assert seen.output_file_id is None and seen.error_file_id is None
        page = httpx.get(site.origin + "/status.json", auth=("me", site.key()))
        assert page.status_code == 200
        sidecar.write_text(json.dumps(forged | {"status": "queued"}))
        page = httpx.get(site.origin + "/status.json", auth=("me", site.key()))
        assert page.status_code == 200 and page.json()["queue"][0]["total"] == 0
        assert httpx.get(site.origin + "/", auth=("me", site.key())).status_code == 200
