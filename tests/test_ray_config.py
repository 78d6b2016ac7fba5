"""The `ray:` mapping of a model in config.yaml: carried to the engine as plain values, and
every bad value refused at load with the key that holds it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from servicekit import batchbox

from watcher.config import ConfigError, load_config
from watcher.machine import model_problem


def write(root: Path, model: dict[str, Any]) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"models": {"big": {"hub": "org/model", **model}}}))
    return path


def test_a_ray_model_carries_its_settings_to_the_engine(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            {
                "backend": "ray",
                "ray": {"address": "10.0.0.5:6379", "concurrency": 2, "num_gpus": 1},
                "environment": {"VLLM_LOGGING_LEVEL": "WARNING"},
                "engine": {"max_model_len": 4096},
            },
        )
    )
    spec = config.model_spec("big")
    assert spec.backend == "ray"
    assert spec.ray == {
        "address": "10.0.0.5:6379",
        "concurrency": 2,
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "backend": "vllm",
    }
    assert spec.environment["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert spec.engine["max_model_len"] == 4096


def test_a_ray_model_without_settings_is_a_local_ray_of_one_replica(tmp_path: Path) -> None:
    spec = load_config(write(tmp_path, {"backend": "ray"})).model_spec("big")
    assert spec.ray["address"] == "local" and spec.ray["concurrency"] == 1
    assert load_config(write(tmp_path, {})).model_spec("big").ray == {}


@pytest.mark.parametrize(
    ("ray", "named", "said"),
    [
        ({"address": "ray://head:10001"}, "models.big.ray.address", "Ray Client"),
        ({"address": "head"}, "models.big.ray.address", "host:port"),
        ({"address": "head:99999"}, "models.big.ray.address", "host:port"),
        ({"concurrency": 0}, "models.big.ray.concurrency", "greater than or equal to 1"),
        ({"num_gpus": -1}, "models.big.ray.num_gpus", "greater than or equal to 0"),
        ({"num_cpus": "two"}, "models.big.ray.num_cpus", "valid number"),
        ({"backend": "ray"}, "models.big.ray.backend", "'vllm' or 'fake'"),
        ({"replicas": 2}, "models.big.ray.replicas", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_ray_value_fails_at_load_naming_the_key(
    tmp_path: Path, ray: dict[str, Any], named: str, said: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, {"backend": "ray", "ray": ray}))
    assert f"At '{named}'" in str(caught.value)
    assert said in str(caught.value)


def test_ray_settings_on_a_model_that_does_not_run_on_ray_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'ray' settings are used only with backend: ray"):
        load_config(write(tmp_path, {"ray": {"concurrency": 2}}))


def test_the_command_line_says_so_with_exit_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, {"backend": "ray", "ray": {"address": "ray://head:10001"}})
    finished = batchbox(path, "check")
    assert finished.returncode == 2
    assert "models.big.ray.address" in finished.stderr


def test_a_gpu_model_on_a_cluster_does_not_need_a_gpu_here(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")
    allowed = {"needs_gpu": True, "allow_download": True}
    on_cluster = load_config(
        write(tmp_path, {**allowed, "backend": "ray", "ray": {"address": "auto", "num_gpus": 1}})
    )
    problem = model_problem(on_cluster, "big", on_cluster.models["big"], gpu=None)
    assert problem is None or "GPU" not in problem
    local = load_config(write(tmp_path, {**allowed, "backend": "ray", "ray": {"num_gpus": 1}}))
    assert model_problem(local, "big", local.models["big"], gpu=None) == (
        "needs a GPU, and this machine has none"
    )


def test_a_cluster_address_where_nothing_answers_fails_in_seconds() -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")
    if ray.is_initialized():
        pytest.skip("this process is a Ray driver already")
    from runner.ray_cluster import RaySettings, connect
    from runner.types import EngineLoadError

    with socket.socket() as unused:  # a port that was free a moment ago: nothing listens
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(EngineLoadError, match="nothing answers at the Ray cluster address"):
        connect(RaySettings(address=f"127.0.0.1:{port}"))
    assert not ray.is_initialized()
