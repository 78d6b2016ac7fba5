"""Listing batches through `batchbox api`: the time to list 1,000 batches, 100 a page, over
plain HTTP (the API's own work) and with the `openai` SDK's auto-paging (which adds the
SDK's parsing of each `Batch`), against the same number of the cheapest authenticated
requests (`GET /v1/models`) made the same way, in the same run.

    python benchmarks/api_list.py [--batches 1000]

No service runs, so every batch waits in the inbox: each one listed is looked up in the
inbox (its `.status`, then its data file), the most work a listed batch costs.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.api_site import running_api  # noqa: E402

LINE = (
    b'{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", '
    b'"body": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}}\n'
)
PAGE = 100


def timed(action, repeats: int = 5) -> float:
    """The median of `repeats` timings of `action`, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=1000)
    arguments = parser.parse_args()
    count = arguments.batches
    with running_api({"requests_per_second": 100_000, "burst": 100_000}) as site:
        client = OpenAI(base_url=site.url, api_key=site.key, _strict_response_validation=True)
        file_id = client.files.create(file=("q.jsonl", io.BytesIO(LINE)), purpose="batch").id
        started = time.perf_counter()
        for _ in range(count):
            client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        creating = time.perf_counter() - started

        pages = -(-count // PAGE)
        http = httpx.Client(headers={"Authorization": f"Bearer {site.key}"})
        listed: list[int] = []

        def list_over_http() -> None:
            found, after = 0, None
            while True:
                query = {"limit": PAGE} | ({"after": after} if after else {})
                page = http.get(f"{site.url}/batches", params=query).json()
                found += len(page["data"])
                if not page["has_more"]:
                    break
                after = page["last_id"]
            listed.append(found)

        raw = timed(list_over_http)
        raw_baseline = timed(lambda: [http.get(f"{site.url}/models") for _ in range(pages)])
        sdk = timed(lambda: listed.append(len(list(client.batches.list(limit=PAGE)))))
        sdk_baseline = timed(lambda: [client.models.list() for _ in range(pages)])
        assert set(listed) == {count}, listed
    print(f"created {count} batches in {creating:.1f} s ({count / creating:.0f} a second)")
    print(f"listing all {count} batches, {pages} pages of {PAGE}, median of 5:")
    print(
        f"  over HTTP: {raw * 1000:.0f} ms; {pages} GET /v1/models: {raw_baseline * 1000:.0f} ms;"
        f" ratio {raw / raw_baseline:.2f}"
    )
    print(
        f"  with the openai SDK: {sdk * 1000:.0f} ms; {pages} models.list(): "
        f"{sdk_baseline * 1000:.0f} ms; ratio {sdk / sdk_baseline:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
