"""API keys: `batchbox key add|list|remove`, a hash kept instead of the key, keys that count
in a running API at once, objects that belong to a key's id and not its name, and the
per-key rate limit."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import httpx
import openai
import pytest
from apikit import api_config, appliance, make_key
from servicekit import batchbox, read_json

from watcher.api.ratelimit import RateLimiter


def test_key_add_prints_the_key_once_as_its_last_line_and_keeps_only_its_hash(
    tmp_path: Path,
) -> None:
    config = api_config(tmp_path)
    result = batchbox(config, "key", "add", "alice")
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("bb-") and len(key) > 40

    stored = (tmp_path / "state" / "api" / "keys.json").read_text()
    assert key not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored

    listed = batchbox(config, "key", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and key not in listed.stdout


def test_key_commands_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    make_key(config, "alice")
    taken = batchbox(config, "key", "add", "alice")
    assert taken.returncode == 1 and "exists" in taken.stderr
    bad = batchbox(config, "key", "add", "../alice")
    assert bad.returncode == 2 and "not a key name" in bad.stderr
    unknown = batchbox(config, "key", "remove", "bob")
    assert unknown.returncode == 1 and "alice" in unknown.stderr
    assert batchbox(config, "key", "remove", "alice").returncode == 0
    assert read_json(tmp_path / "state" / "api" / "keys.json") == {"keys": []}


def test_the_running_api_sees_keys_added_and_removed_without_a_restart(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        alice = site.client("alice")
        assert alice.models.list().data
        bob = site.client("bob")  # made now, while the API runs
        assert bob.models.list().data
        assert batchbox(site.config_path, "key", "remove", "alice").returncode == 0
        with pytest.raises(openai.AuthenticationError):
            alice.models.list()
        assert bob.models.list().data


def test_a_key_made_again_under_a_removed_name_sees_nothing_of_the_old_one(
    tmp_path: Path,
) -> None:
    with appliance(tmp_path) as site:
        old = site.client("alice")
        file_id = old.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id
        assert batchbox(site.config_path, "key", "remove", "alice").returncode == 0
        del site.keys["alice"]
        new = site.client("alice")
        assert list(new.files.list()) == []
        with pytest.raises(openai.NotFoundError):
            new.files.retrieve(file_id)


def test_the_key_can_come_as_the_basic_password(tmp_path: Path) -> None:
    with appliance(tmp_path) as site:
        url = f"{site.base_url}/models"
        assert httpx.get(url, auth=("anyone", site.key())).status_code == 200
        assert httpx.get(url, auth=("anyone", "bb-wrong")).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Basic !!!"}).status_code == 401


def test_the_rate_limit_is_a_token_bucket_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == 1  # empty: half a second to the next token, said as 1 s
    assert limiter.take("b") is None  # another key's bucket is full
    now[0] += 0.5
    assert limiter.take("a") is None
    assert limiter.take("a") == 1
    now[0] += 10.0  # refills up to the burst, no further
    assert [limiter.take("a") for _ in range(4)] == [None, None, None, 1]


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:99999", "a b:80"])
def test_a_bad_listen_address_is_a_config_error_naming_it(tmp_path: Path, listen: str) -> None:
    config = api_config(tmp_path, api={"listen": listen})
    result = batchbox(config, "api")
    assert result.returncode == 2
    assert "api.listen" in result.stderr
