"""Serve settings: defaults < YAML < environment < overrides, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.errors import InvalidInput
from service.settings import ServeSettings


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "steady.yaml"
    config.write_text("max_batch_size: 4\nport: 9000\ncanary_fraction: 0.2\n")
    env = {"STEADY_PORT": "9100", "STEADY_ADMIN_TOKEN": "env-token-123", "STEADY_WARMUP_BATCH_SIZES": "1,2"}
    s = ServeSettings.build("/models", config=config, environ=env, overrides={"port": 9200, "host": None})
    assert (s.max_batch_size, s.port, s.canary_fraction, s.admin_token) == (4, 9200, 0.2, "env-token-123")
    assert s.host == "127.0.0.1" and s.warmup_batch_sizes == (1, 2)
    assert "env-token" not in repr(s)
    assert ServeSettings.from_dict(s.to_dict()) == s


def test_defaults_fit_two_cores() -> None:
    s = ServeSettings.build("/models", environ={})
    assert s.ort_threads == 2 and s.max_ongoing_requests >= s.max_batch_size
    assert s.batch_sizes_to_warm == (1, s.max_batch_size)
    opts = s.deployment_options()
    assert opts["num_replicas"] == 1 and opts["ray_actor_options"] == {"num_cpus": 2.0}
    auto = s.replace(autoscaling={"min_replicas": 1, "max_replicas": 3}).deployment_options()
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 3


def test_nested_config_and_per_model_mode(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("steady:\n  candidate_mode: shadow\n  model_candidate_mode: {a: canary}\n")
    s = ServeSettings.build("/m", config=config, environ={})
    assert s.candidate_mode_of("a") == "canary" and s.candidate_mode_of("b") == "shadow"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 16, "max_ongoing_requests": 8}, "batches never fill"),
        ({"canary_fraction": 1.5}, "canary_fraction"),
        ({"candidate_mode": "blue"}, "candidate_mode"),
        ({"provider": "tpu"}, "provider"),
        ({"admin_token": "short"}, "admin_token"),
        ({"no_such_knob": 1}, "unknown serve settings"),
        ({"model_candidate_mode": {"a": "x"}}, "model_candidate_mode"),
    ],
)
def test_invalid_values_are_named(change: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ServeSettings.build("/models", environ={}, overrides=change)


def test_repo_required_and_bad_env() -> None:
    with pytest.raises(InvalidInput, match="repository"):
        ServeSettings.build(None, environ={})
    with pytest.raises(InvalidInput, match="STEADY_PORT"):
        ServeSettings.build("/m", environ={"STEADY_PORT": "eighty"})


def test_shipped_configs_parse() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    ServeSettings.build("/m", config=root / "deploy" / "steady.yaml", environ={})
    serve_cfg = yaml.safe_load((root / "deploy" / "serve.yaml").read_text())
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "service.app:build_app"
    args = dict(app["args"])
    ServeSettings.build(args.pop("repo"), overrides=args, environ={})


def test_hot_path_knobs() -> None:
    base = ServeSettings.build("/m", environ={})
    assert base.inline_decode_bytes == 0 and base.access_log
    assert "logging_config" not in base.deployment_options()
    quiet = ServeSettings.build("/m", environ={"STEADY_ACCESS_LOG": "false", "STEADY_INLINE_DECODE_BYTES": "4096"})
    assert quiet.deployment_options()["logging_config"] == {"enable_access_log": False}
    assert quiet.inline_decode_bytes == 4096
    with pytest.raises(InvalidInput, match="inline_decode_bytes"):
        ServeSettings.build("/m", environ={}, overrides={"inline_decode_bytes": -1})


def test_preprocess_device_is_validated() -> None:
    assert ServeSettings.build("/m", environ={}).preprocess_device == "auto"
    assert ServeSettings.build("/m", environ={"STEADY_PREPROCESS_DEVICE": "dali-cpu"}).preprocess_device == "dali-cpu"
    gpu = ServeSettings.build("/m", overrides={"preprocess_device": "gpu", "replica_gpus": 1, "provider": "cuda"}, environ={})
    assert gpu.deployment_options()["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(InvalidInput, match="preprocess_device.*'tpu'"):
        ServeSettings.build("/m", overrides={"preprocess_device": "tpu"}, environ={})
    with pytest.raises(InvalidInput, match="preprocess_device gpu needs replica_gpus"):
        ServeSettings.build("/m", overrides={"preprocess_device": "gpu"}, environ={})
    with pytest.raises(InvalidInput, match="preprocess_device gpu needs provider cuda or auto"):
        ServeSettings.build("/m", overrides={"preprocess_device": "gpu", "replica_gpus": 1, "provider": "cpu"}, environ={})


def test_the_gpu_config_parses() -> None:
    root = Path(__file__).resolve().parents[2]
    s = ServeSettings.build("/m", config=root / "deploy" / "steady-gpu.yaml", environ={})
    assert (s.provider, s.preprocess_device, s.replica_gpus) == ("cuda", "gpu", 1.0)
    assert 64 <= s.max_batch_size <= 128 and s.max_ongoing_requests >= s.max_batch_size


def test_autoscaling_is_checked_like_ray_serve_but_refuses_unknown_keys(tmp_path: Path) -> None:
    ok = ServeSettings.build("/m", overrides={"autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                              "target_ongoing_requests": 4}}, environ={})
    assert ok.deployment_options()["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                                             "target_ongoing_requests": 4}
    # Ray Serve's own AutoscalingConfig accepts a misspelt key and ignores it; Steady refuses it
    with pytest.raises(InvalidInput, match=r"autoscaling: unknown keys \['max_replica'\]"):
        ServeSettings.build("/m", overrides={"autoscaling": {"max_replica": 3}}, environ={})
    with pytest.raises(InvalidInput, match=r"autoscaling: max_replicas \(1\) must be greater than or equal to "
                                           r"min_replicas \(2\)"):
        ServeSettings.build("/m", overrides={"autoscaling": {"min_replicas": 2, "max_replicas": 1}}, environ={})
    with pytest.raises(InvalidInput, match="autoscaling: target_ongoing_requests: Input should be greater than 0"):
        ServeSettings.build("/m", overrides={"autoscaling": {"target_ongoing_requests": 0}}, environ={})
    # the same setting from steady serve's environment and config file
    env = ServeSettings.build("/m", environ={"STEADY_AUTOSCALING": "{min_replicas: 1, max_replicas: 2}"})
    assert env.deployment_options()["autoscaling_config"]["max_replicas"] == 2
    with pytest.raises(InvalidInput, match="environment STEADY_AUTOSCALING="):
        ServeSettings.build("/m", environ={"STEADY_AUTOSCALING": "{upscale_delay_s: soon}"})
    config = tmp_path / "s.yaml"
    config.write_text("autoscaling:\n  min_replicas: 1\n  max_replicas: 4\n  upscale_delay_s: 5\n")
    assert ServeSettings.build("/m", config=config, environ={}).autoscaling == {
        "min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5}
