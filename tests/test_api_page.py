"""The status page: only for a key, self-contained, and right in a real browser (Debian's
headless Chromium) while a job runs."""

from __future__ import annotations

import io
import os
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from apikit import SLOW, Appliance, appliance, chat_requests, finish, kill_tree, poll
from servicekit import drop, read_json, wait_for

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>.jsonl"  # a name anyone may drop into the inbox


@dataclass
class Node:
    tag: str
    attributes: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def all(self, tag: str) -> list[Node]:
        found = [self] if self.tag == tag else []
        for child in self.children:
            found += child.all(tag)
        return found

    def by_id(self, wanted: str) -> Node | None:
        if self.attributes.get("id") == wanted:
            return self
        for child in self.children:
            hit = child.by_id(wanted)
            if hit is not None:
                return hit
        return None

    def content(self) -> str:
        return "".join(self.text) + "".join(child.content() for child in self.children)


class Dom(HTMLParser):
    """Enough of a DOM to check the page Chromium rendered."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "circle", "line", "polyline"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, 0, -1):
            if self.stack[index].tag == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def chromium(profile: Path, url: str, *arguments: str) -> str:
    """Run headless Chromium once; its standard output. Its whole process tree is ended."""
    process = subprocess.Popen(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *arguments, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        kill_tree(process)
    return output


def upload_and_create(site: Appliance, data: bytes) -> str:
    client = site.client()
    file_id = client.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="batch").id
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def test_the_page_is_for_key_holders_only_and_loads_nothing_from_elsewhere(
    tmp_path: Path,
) -> None:
    with appliance(tmp_path) as site:
        for path in ("/", "/status.json"):
            response = httpx.get(site.origin + path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Basic ")
            assert set(response.json()) == {"error"}  # nothing of the page
        response = httpx.get(site.origin + "/", auth=("me", "bb-wrong"))
        assert response.status_code == 401
        response = httpx.get(site.origin + "/", auth=("me", site.key()))
        assert response.status_code == 200 and "<svg" in response.text
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        dom = Dom(response.text).root
        for node in dom.all("script") + dom.all("link") + dom.all("img"):
            assert "src" not in node.attributes and "href" not in node.attributes
        bearer = {"Authorization": f"Bearer {site.key()}"}
        status = httpx.get(site.origin + "/status.json", headers=bearer)
        assert set(status.json()) == {"generated_at", "running", "queue", "recent", "plots"}


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"
)
def test_the_page_in_a_real_browser_while_a_job_runs(tmp_path: Path) -> None:
    with appliance(tmp_path, serve=True, engine=SLOW) as site:
        client = site.client()
        for _ in range(2):  # a history for the recent jobs and the plots
            assert finish(client, upload_and_create(site, chat_requests(3))).status == "completed"
        running = upload_and_create(site, chat_requests(400, "r"))
        poll(
            lambda: client.batches.retrieve(running),
            lambda batch: batch.status == "in_progress" and batch.request_counts.completed >= 2,
            60,
            "a job to be running",
        )
        queued = upload_and_create(site, chat_requests(5))
        drop(site.inbox, HOSTILE, chat_requests(2))
        for stem in (f"api-{queued}", HOSTILE.removesuffix(".jsonl")):
            wait_for(
                lambda stem=stem: (
                    (site.inbox / f"{stem}.status").exists()
                    and read_json(site.inbox / f"{stem}.status")["status"] == "queued"
                ),
                60,
                f"{stem} to be queued",
            )

        host = site.origin.removeprefix("http://")
        url = f"http://viewer:{site.key()}@{host}/"  # the key as the Basic password
        # Virtual time runs the page's refresh timer at once; the fetches are real.
        html = chromium(tmp_path / "profile-dom", url, "--virtual-time-budget=8000", "--dump-dom")
        dom = Dom(html).root
        body = dom.all("body")[0]
        assert int(body.attributes["data-refreshes"]) >= 1, "the page did not refresh itself"

        box = dom.by_id("running")
        assert f"api-{running}.jsonl" in box.content()
        bar = [node for node in box.all("div") if node.attributes.get("role") == "progressbar"]
        assert len(bar) == 1 and 0 < int(bar[0].attributes["aria-valuenow"]) < 100
        assert "tokens/s" in box.content() and "done" in box.content()

        rows = dom.by_id("queue").all("tbody")[0].all("tr")
        names = [row.all("td")[1].content() for row in rows]
        assert f"api-{queued}.jsonl" in names and HOSTILE in names  # a name, shown as text
        assert dom.all("img") == []
        assert all("(in " in row.all("td")[4].content() for row in rows)  # an expected finish

        recent = dom.by_id("recent").all("tbody")[0].all("tr")
        assert len(recent) == 2
        assert all(row.all("td")[2].content() == "completed" for row in recent)
        assert all(" vs " in row.all("td")[7].content() for row in recent)

        for plot in ("plot-throughput", "plot-eta-error"):
            assert len(dom.by_id(plot).all("circle")) == 2, plot

        screenshot = tmp_path / "status-page.png"
        chromium(
            tmp_path / "profile-shot",
            url,
            "--window-size=1280,1500",
            "--virtual-time-budget=8000",
            f"--screenshot={screenshot}",
        )
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(screenshot) > 10_000
