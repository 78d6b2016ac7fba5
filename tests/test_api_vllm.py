"""One batch through the HTTP API on the real vLLM engine with the shipped small model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from apikit import Appliance, finish, outputs
from helpers import chat_line, shipped_config
from servicekit import jsonl

pytestmark = pytest.mark.vllm


def test_a_batch_through_the_api_on_the_real_engine(tmp_path: Path) -> None:
    config_path = shipped_config(
        tmp_path,
        settle_seconds=0.5,
        rescan_seconds=1,
        min_free_bytes=0,
        api={"listen": "127.0.0.1:0"},
    )
    site = Appliance(root=tmp_path, config_path=config_path)
    try:
        site.start_api().start_serve()
        client = site.client()
        questions = ["What is the capital of France?", "Name a colour.", "Say hello.", "2+2?"]
        lines = [
            chat_line(f"q{index}", text, max_tokens=12, temperature=0, seed=index)
            for index, text in enumerate(questions)
        ]
        file_id = client.files.create(
            file=("questions.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
        ).id
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = finish(client, batch.id, timeout=900)
        assert batch.status == "completed", batch
        assert batch.model == "smollm2-135m"
        assert batch.request_counts.completed == 4 and batch.request_counts.failed == 0
        assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
        results, errors = outputs(client, batch)
        assert errors == [] and sorted(record["custom_id"] for record in results) == [
            "q0",
            "q1",
            "q2",
            "q3",
        ]
        for record in results:
            body = record["response"]["body"]
            assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m"
            assert body["choices"][0]["message"]["content"].strip()
            assert 0 < body["usage"]["completion_tokens"] <= 12
    finally:
        site.stop()
