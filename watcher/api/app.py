"""The HTTP door: OpenAI's `/v1/files`, `/v1/batches` and `/v1/models`, and the status page.

Every request but the unknown ones carries a key (`Authorization: Bearer KEY`, or the key as
the HTTP Basic password, which a browser can send); each key sees only its own objects and
spends its own allowance of requests.
"""

from __future__ import annotations

import base64
import shutil
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from filelock import FileLock, Timeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from runner.durable import make_folders_durably
from watcher.api.batches import BatchStore, CreateBatch
from watcher.api.contract import Contract
from watcher.api.errors import ApiError, bad_request, install_error_handlers
from watcher.api.files import FileStore, public_file
from watcher.api.guard import BodyGuard, BodyTimeout, body_timeout_error
from watcher.api.keys import ApiKey, KeyRing
from watcher.api.page import PAGE_HEADERS, page_html
from watcher.api.ratelimit import RateLimiter
from watcher.api.status import History, appliance_status
from watcher.api.storage import CONTENT, FILE_PREFIX, ApiFolders, new_id
from watcher.api.upload import MULTIPART_OVERHEAD, receive_upload, too_large
from watcher.config import Config

# A download goes out in pieces this large; a client that does not take one within
# `api.body_timeout_seconds` (under 9 KiB/s at the default 30 s) is dropped.
READ_BYTES = 256 << 10


class Json(JSONResponse):
    """JSON by orjson, returned as it is: FastAPI's own encoding of a returned dict takes
    tens of milliseconds for a page of 100 batches."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class AlreadyServing(Exception):
    """Another `batchbox api` holds this state folder."""


@dataclass
class Api:
    config: Config
    folders: ApiFolders
    contract: Contract
    keys: KeyRing
    limiter: RateLimiter
    files: FileStore
    batches: BatchStore
    history: History
    lock: FileLock
    started: int = field(default_factory=lambda: int(time.time()))

    def close(self) -> None:
        self.lock.release()


def open_api(config: Config) -> Api:
    """Take the API's lock on `state/api/`, tidy what a crash left, and load the records."""
    folders = ApiFolders(config.folder("state") / "api")
    make_folders_durably(folders.root)
    lock = FileLock(folders.server_lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AlreadyServing(
            f"another batchbox api is serving {folders.root} (it holds {folders.server_lock})"
        ) from None
    folders.make()
    folders.sweep()
    make_folders_durably(config.folder("inbox"))
    contract = Contract(config.folder("inbox"), config.folder("outbox"))
    contract.sweep_temporaries()
    files = FileStore(folders, contract)
    files.load()
    batches = BatchStore(folders, contract, files, config.keep_status_hours)
    batches.load()
    return Api(
        config=config,
        folders=folders,
        contract=contract,
        keys=KeyRing(folders),
        limiter=RateLimiter(config.api.requests_per_second, config.api.burst),
        files=files,
        batches=batches,
        history=History(config.folder("state")),
        lock=lock,
    )


# -- keys ----------------------------------------------------------------------------------


def token_from(header: str | None) -> str | None:
    """The key in `Bearer KEY`, or the password in `Basic base64(user:KEY)`."""
    scheme, _, value = (header or "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def authenticate(api: Api, request: Request, challenge: str) -> ApiKey:
    token = token_from(request.headers.get("authorization"))
    headers = {"WWW-Authenticate": challenge}
    if token is None:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'; "
            "`batchbox key add NAME` makes one.",
            code="missing_api_key",
            headers=headers,
        )
    key = api.keys.find(token)
    if key is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers=headers)
    wait = api.limiter.take(key.id)
    if wait is not None:
        raise ApiError(
            429,
            f"Rate limit reached for this key ({api.config.api.requests_per_second:g} requests "
            f"a second, {api.config.api.burst} at once); try again in {wait} s.",
            kind="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
    return key


async def caller(request: Request) -> ApiKey:
    return authenticate(request.app.state.api, request, "Bearer")


async def viewer(request: Request) -> ApiKey:
    """The page's check: a browser asked with `Basic` offers its password prompt."""
    return authenticate(request.app.state.api, request, 'Basic realm="batchbox", charset="UTF-8"')


Caller = Annotated[ApiKey, Depends(caller)]
Viewer = Annotated[ApiKey, Depends(viewer)]


# -- the app -------------------------------------------------------------------------------


def _list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def _stream(descriptor: int):
    with open(descriptor, "rb", closefd=True) as handle:
        while chunk := handle.read(READ_BYTES):
            yield chunk


def build_app(api: Api) -> FastAPI:
    app = FastAPI(title="batchbox", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.state.api = api
    app.add_middleware(
        BodyGuard,
        max_body_bytes=api.config.api.max_body_bytes,
        idle_seconds=api.config.api.body_timeout_seconds,
        streamed=lambda method, path: method == "POST" and path == "/v1/files",
    )

    @app.get("/", response_class=HTMLResponse)
    def page(key: Viewer) -> HTMLResponse:
        data = appliance_status(api.contract.inbox, api.history)
        return HTMLResponse(page_html(data), headers=PAGE_HEADERS)

    @app.get("/status.json")
    def status_json(key: Viewer) -> Response:
        data = appliance_status(api.contract.inbox, api.history)
        return Json(data, headers={"Cache-Control": "no-store"})

    @app.get("/v1/models")
    def models(key: Caller) -> Response:
        return Json(
            {"object": "list", "data": [model_object(api, alias) for alias in api.config.models]}
        )

    @app.get("/v1/models/{model}")
    def model(model: str, key: Caller) -> Response:
        if model not in api.config.models:
            raise ApiError(404, f"The model '{model}' does not exist.", code="model_not_found")
        return Json(model_object(api, model))

    @app.post("/v1/files")
    async def create_file(request: Request, key: Caller) -> Response:
        return Json(public_file(await receive_file(api, request, key)))

    @app.get("/v1/files")
    def list_files(
        key: Caller,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> Response:
        records, has_more = api.files.page(key.id, after, limit, order, purpose)
        return Json(_list([public_file(record) for record in records], has_more))

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, key: Caller) -> Response:
        return Json(public_file(api.files.get(key.id, file_id)))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, key: Caller) -> StreamingResponse:
        record = api.files.get(key.id, file_id)
        descriptor = api.files.open(record)
        if descriptor is None:
            raise ApiError(404, f"The content of file '{file_id}' is no longer there.")
        return StreamingResponse(
            _stream(descriptor),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{file_id}.jsonl"'},
        )

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, key: Caller) -> Response:
        api.files.delete(key.id, file_id)
        return Json({"id": file_id, "object": "file", "deleted": True})

    @app.post("/v1/batches")
    def create_batch(body: CreateBatch, key: Caller) -> Response:
        return Json(api.batches.create(key.id, body))

    @app.get("/v1/batches")
    def list_batches(
        key: Caller,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        return Json(_list(*api.batches.page(key.id, after, limit)))

    @app.get("/v1/batches/{batch_id}")
    def retrieve_batch(batch_id: str, key: Caller) -> Response:
        return Json(api.batches.get(key.id, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, key: Caller) -> Response:
        return Json(api.batches.cancel(key.id, batch_id))

    return app


def model_object(api: Api, alias: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": api.started, "owned_by": "batchbox"}


async def receive_file(api: Api, request: Request, key: ApiKey) -> dict[str, Any]:
    """Stream an upload into `tmp/<id>/content`, then register it by one rename."""
    limit = api.config.limits.max_file_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise too_large(limit)  # said up front: nothing is read
    file_id = new_id(FILE_PREFIX)
    folder = api.folders.tmp / file_id
    folder.mkdir()
    try:
        upload = await receive_upload(
            request.stream(), request.headers.get("content-type"), folder / CONTENT, limit
        )
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise bad_request("Missing required parameter: 'purpose'.", "purpose")
        if purpose != "batch":
            raise bad_request(
                f"Invalid purpose '{purpose}': batchbox keeps files for 'batch' only.", "purpose"
            )
        record = {
            "id": file_id,
            "object": "file",
            "bytes": upload.size,
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": purpose,
            "status": "processed",
            "owner": key.id,
        }
        return await run_in_threadpool(api.files.register_upload, folder, record)
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)  # nothing half made, and at once
        if isinstance(error, BodyTimeout):
            raise body_timeout_error(api.config.api.body_timeout_seconds) from None
        if isinstance(error, ClientDisconnect):
            raise bad_request("The client went away during the upload.") from None
        raise
