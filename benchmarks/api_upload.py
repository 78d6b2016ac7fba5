"""A large upload through `batchbox api`: its speed against `dd` writing the same bytes to
the same disk in the same run, and the API process's peak memory, which must not grow with
the file.

    python benchmarks/api_upload.py [--mib 1024]

The client streams a multipart body of `--mib` MiB of JSONL from memory (one repeated
block, so the client neither reads a disk nor holds the file). `dd` writes as many bytes
from /dev/zero with `conv=fsync`, as the upload is fsynced before it counts. Peak memory is
the API process's VmHWM after a 1 MiB upload and after the large one; its CPU time shows
what the upload costs the API itself, apart from the client on the same machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.api_site import Site, running_api  # noqa: E402

MIB = 1 << 20
LINE = (
    b'{"custom_id": "q", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"messages": [{"role": "user", "content": "How far is the moon?"}], "max_tokens": 8}}\n'
)
BOUNDARY = "benchmarkboundary"


def body(size: int) -> tuple[int, Iterator[bytes]]:
    """A multipart upload of `size` bytes of JSONL: its length and its chunks."""
    block = (LINE * (MIB // len(LINE) + 1))[:MIB]
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        sent = 0
        while sent < size:
            piece = block[: min(MIB, size - sent)]
            sent += len(piece)
            yield piece
        yield tail

    return len(head) + size + len(tail), chunks()


def upload(site: Site, size: int) -> float:
    length, chunks = body(size)
    headers = {
        "Authorization": f"Bearer {site.key}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    started = time.perf_counter()
    response = httpx.post(f"{site.url}/files", headers=headers, content=chunks, timeout=600)
    seconds = time.perf_counter() - started
    if response.status_code != 200 or response.json()["bytes"] != size:
        raise SystemExit(f"the upload failed: {response.status_code} {response.text[:300]}")
    return seconds


def dd(folder: Path, size: int) -> float:
    target = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", f"bs={MIB}", f"count={size // MIB}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the large upload")
    arguments = parser.parse_args()
    size = arguments.mib * MIB
    with running_api({"requests_per_second": 1000, "burst": 1000}) as site:
        upload(site, MIB)
        small_peak = site.peak_rss_bytes()
        dd_seconds = dd(site.root / "state", size)
        cpu_before = sum(psutil.Process(site.pid).cpu_times()[:2])
        upload_seconds = upload(site, size)
        api_cpu = sum(psutil.Process(site.pid).cpu_times()[:2]) - cpu_before
        large_peak = site.peak_rss_bytes()
        dd_again = dd(site.root / "state", size)
    baseline = min(dd_seconds, dd_again)
    print(
        f"upload of {arguments.mib} MiB through batchbox api: {upload_seconds:.1f} s, "
        f"{size / MIB / upload_seconds:.0f} MiB/s"
    )
    print(
        f"dd of the same bytes (conv=fsync), best of two: {baseline:.1f} s, "
        f"{size / MIB / baseline:.0f} MiB/s"
    )
    print(f"upload time / dd time: {upload_seconds / baseline:.2f}")
    print(
        f"CPU time of the API process for the upload: {api_cpu:.1f} s "
        f"({size / MIB / api_cpu:.0f} MiB per CPU second; the client shares the machine)"
    )
    print(
        f"API peak memory: {small_peak / MIB:.1f} MiB after a 1 MiB upload, "
        f"{large_peak / MIB:.1f} MiB after {arguments.mib} MiB "
        f"(ratio {large_peak / small_peak:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
