"""Uploads against a live `batchbox api`: streamed to disk and stopped at the limit, file
names that are never paths, ids checked against their format, and clients that stall or
vanish part way (each leaves nothing behind)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from apikit import Appliance, appliance, chat_requests, leftovers
from servicekit import wait_for


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Appliance]:
    with appliance(
        tmp_path,
        api={"header_timeout_seconds": 1, "body_timeout_seconds": 1},
        limits={"max_file_bytes": 200_000},
    ) as site:
        yield site


def registered(site: Appliance) -> list[str]:
    return sorted(path.name for path in (site.state / "files").iterdir())


def test_an_upload_round_trips_and_a_deleted_one_is_gone(site: Appliance) -> None:
    client = site.client()
    data = chat_requests(50)
    made = client.files.create(file=("questions.jsonl", io.BytesIO(data)), purpose="batch")
    assert (made.filename, made.bytes, made.purpose, made.status) == (
        "questions.jsonl",
        len(data),
        "batch",
        "processed",
    )
    assert client.files.content(made.id).content == data
    assert (site.state / "files" / made.id / "content").read_bytes() == data
    deleted = client.files.delete(made.id)
    assert deleted.deleted and deleted.id == made.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    assert registered(site) == [] and leftovers(site) == []


@pytest.mark.parametrize(
    "name", ["../../outside.jsonl", "/etc/passwd", "..", "a/b\\c.jsonl", "späť ✓.jsonl"]
)
def test_a_multipart_file_name_is_only_ever_the_objects_filename(
    site: Appliance, name: str
) -> None:
    client = site.client()
    before = set(site.root.rglob("*"))
    made = client.files.create(file=(name, io.BytesIO(b"{}\n")), purpose="batch")
    assert client.files.retrieve(made.id).filename == name
    created = {path for path in set(site.root.rglob("*")) - before if path.is_file()}
    files = site.state / "files" / made.id
    assert created == {files / "content", files / "record.json"}


def test_ids_are_checked_against_their_format_before_any_path(site: Appliance) -> None:
    headers = {"Authorization": f"Bearer {site.key()}"}
    for path in (
        "/v1/files/..%2Fkeys.json",
        "/v1/files/..%2F..%2Fapi%2Fkeys.json/content",
        "/v1/files/file-abc",
        "/v1/batches/..%2F..%2Fbatches",
        "/v1/batches/batch_" + "0" * 24,
    ):
        response = httpx.get(site.origin + path, headers=headers)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_upload_over_the_limit_is_refused_and_kept_nowhere(site: Appliance) -> None:
    client = site.client()
    with pytest.raises(openai.APIStatusError) as raised:  # the size said up front
        client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 300_000)), purpose="batch")
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "file_too_large"

    # sent in chunks with no length given: stopped when the file passes the limit
    boundary = "b0undary"

    def body() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'.encode()
        yield b"batch\r\n"
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.jsonl"\r\n\r\n'
        ).encode()
        for _ in range(40):
            yield b"y" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{site.base_url}/files",
        headers={
            "Authorization": f"Bearer {site.key()}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=body(),
    )
    assert response.status_code == 413
    assert registered(site) == [] and leftovers(site) == []


def test_malformed_uploads_are_400(site: Appliance) -> None:
    headers = {"Authorization": f"Bearer {site.key()}"}
    url = f"{site.base_url}/files"
    cases = [
        {"content": b"{}", "headers": {"Content-Type": "application/json"}},
        {"files": {"file": ("a.jsonl", b"{}\n")}},  # no purpose
        {"data": {"purpose": "batch"}},  # no file
        {"data": {"purpose": "batch", "extra": "1"}, "files": {"file": ("a.jsonl", b"{}\n")}},
        {
            "content": b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
            b"\r\nhalf a file",
            "headers": {"Content-Type": "multipart/form-data; boundary=x"},
        },
    ]
    for case in cases:
        response = httpx.post(url, headers=headers | case.pop("headers", {}), **case)
        assert response.status_code == 400, (case, response.text)
    assert registered(site) == [] and leftovers(site) == []


def raw_connection(site: Appliance) -> socket.socket:
    address = urlsplit(site.origin)
    return socket.create_connection((address.hostname, address.port), timeout=60)


def upload_head(site: Appliance, length: int) -> bytes:
    boundary = "zz"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    )
    return (
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key()}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n{part}"
    ).encode()


def test_a_client_killed_mid_upload_leaves_nothing(site: Appliance) -> None:
    connection = raw_connection(site)
    connection.sendall(upload_head(site, 150_000) + b"z" * 60_000)
    # the upload is on its way in: its data is in state/api/tmp
    wait_for(
        lambda: any(path.name == "content" for path in (site.state / "tmp").rglob("*")),
        30,
        "the upload to start",
    )
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    connection.close()  # a reset, as when the client process dies
    wait_for(lambda: leftovers(site) == [], 30, "the partial upload to be removed")
    assert registered(site) == []
    assert site.client().files.list().data == []


def test_a_stalled_body_times_out_with_408(site: Appliance) -> None:
    connection = raw_connection(site)
    connection.sendall(upload_head(site, 150_000) + b"z" * 1000)
    reply = connection.recv(65536)  # nothing more is sent: the API gives up after 1 s
    assert reply.startswith(b"HTTP/1.1 408"), reply
    wait_for(lambda: leftovers(site) == [], 30, "the stalled upload to be removed")
    assert registered(site) == []
    connection.close()
    # the same for a small JSON body that stops half way
    connection = raw_connection(site)
    connection.sendall(
        f"POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key()}\r\n"
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"input'.encode()
    )
    assert connection.recv(65536).startswith(b"HTTP/1.1 408")
    connection.close()


def test_slow_or_missing_request_headers_close_the_connection(site: Appliance) -> None:
    silent = raw_connection(site)
    slow = raw_connection(site)
    slow.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    # closed by the API (a timeout on this side would raise instead)
    assert silent.recv(1024) == b""
    assert slow.recv(1024) == b""
    silent.close()
    slow.close()


def test_the_header_deadline_never_cuts_a_request_short(tmp_path: Path) -> None:
    """A slow upload outlives the header deadline (1 s) while each piece of it arrives within
    the body timeout (10 s); then the same connection serves another request."""
    with appliance(tmp_path, api={"header_timeout_seconds": 1, "body_timeout_seconds": 10}) as site:
        address = urlsplit(site.origin)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        pieces = [
            b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n',
            b"{}\n",
            b"{}\n",
            b'\r\n--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch',
            b"\r\n--zz--\r\n",
        ]
        connection.putrequest("POST", "/v1/files")
        connection.putheader("Authorization", f"Bearer {site.key()}")
        connection.putheader("Content-Type", "multipart/form-data; boundary=zz")
        connection.putheader("Content-Length", str(sum(len(piece) for piece in pieces)))
        connection.endheaders()
        for piece in pieces:
            time.sleep(1.5)  # the slow client under test
            connection.send(piece)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        connection.request("GET", "/v1/files", headers={"Authorization": f"Bearer {site.key()}"})
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["data"]) == 1
        connection.close()


def upload_large(site: Appliance, mib: int) -> str:
    """Upload `mib` MiB streamed from memory; the new file's id."""
    boundary = "mem"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"'
        "\r\n\r\n"
    ).encode()
    block = (b"{}\n" * (1 << 19))[: 1 << 20]

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(mib):
            yield block
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{site.base_url}/files",
        headers={
            "Authorization": f"Bearer {site.key()}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=chunks(),
        timeout=600,
    )
    assert response.status_code == 200 and response.json()["bytes"] == mib << 20
    return response.json()["id"]


def test_memory_stays_flat_during_a_large_upload(tmp_path: Path) -> None:
    """64 MiB through the API raise its peak memory by far less than the file."""
    with appliance(tmp_path) as site:
        pid = site.api.process.pid
        site.client().files.create(file=("small.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        before = peak_memory(pid)
        upload_large(site, 64)
        assert peak_memory(pid) - before < 16 << 20


def test_a_client_that_stops_reading_a_download_is_dropped(tmp_path: Path) -> None:
    with appliance(tmp_path, api={"body_timeout_seconds": 1}) as site:
        file_id = upload_large(site, 64)
        connection = raw_connection(site)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        connection.sendall(
            f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {site.key()}\r\n\r\n".encode()
        )
        # nothing is read until the API has given up on this client
        wait_for(lambda: site.api.events("api_client_stalled"), 60, "the API to give up")
        received = 0
        while chunk := connection.recv(1 << 20):
            received += len(chunk)
        connection.close()
        assert 0 < received < 64 << 20  # cut off, not sent whole
        assert len(site.client().files.list().data) == 1  # and the API serves on


def peak_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
