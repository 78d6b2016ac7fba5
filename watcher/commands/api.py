"""`batchbox api`: the OpenAI-compatible Files and Batches API and the status page, served
on `api.listen` (a client of the folder contract, see `watcher.api`)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

import structlog
import uvicorn

from watcher.api.app import AlreadyServing, build_app, open_api
from watcher.api.guard import header_timeout_protocol
from watcher.config import Config
from watcher.errors import EXIT_OK, CommandFailed
from watcher.logs import configure_logging
from watcher.notify import notify

log = structlog.get_logger()

MAX_CONNECTIONS = 256  # beyond this uvicorn answers 503 rather than holding more sockets


def _http_protocol() -> type:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # httptools is optional; h11 always comes with uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def listen(address: tuple[str, int]) -> socket.socket:
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        raise CommandFailed(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


class ApiServer(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = (sockets or [])[0].getsockname()[:2]
            log.info("api_ready", listen=f"{host}:{port}", url=f"http://{host}:{port}/v1")
            notify("READY=1")


def serve_api(args: argparse.Namespace, config: Config) -> int:
    configure_logging(sys.stdout)
    # A malformed upload is answered 400 with the parser's reason; its warning adds nothing.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    sock = listen(config.api.address)
    try:
        api = open_api(config)
    except AlreadyServing as error:
        sock.close()
        raise CommandFailed(str(error)) from None
    settings = config.api
    server = ApiServer(
        uvicorn.Config(
            build_app(api),
            http=header_timeout_protocol(_http_protocol(), settings.header_timeout_seconds),
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=settings.keep_alive_seconds,
            timeout_graceful_shutdown=5,
            limit_concurrency=MAX_CONNECTIONS,
        )
    )
    # uvicorn raises the stopping signal again once it has shut down; with these handlers
    # in place that ends here, as a clean stop, instead of killing the process.
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        api.close()
        sock.close()
    if not server.started:
        raise CommandFailed("the API did not start; its log says why")
    log.info("api_stopped")
    return EXIT_OK
