"""The one metrics module: names, labels and values recorded through the memory backend."""

from __future__ import annotations

import pytest

from service.metrics import Metrics, robustness_metric_name


def test_request_counts_and_latency_by_label() -> None:
    m = Metrics("memory")
    m.request("tiny", "1", "production", 200, 0.01)
    m.request("tiny", "1", "production", 200, 0.03)
    m.request("tiny", "2", "candidate", 503, 0.5)
    assert m.count("steady_requests", model="tiny", code="200") == 2.0
    assert m.count("steady_requests", stage="candidate", code="503") == 1.0
    assert sorted(m.observations("steady_request_latency_seconds", version="1")) == [0.01, 0.03]


def test_batch_records_size_inference_and_each_queue_wait() -> None:
    m = Metrics("memory")
    m.batch("tiny", "1", 3, 0.02, [0.001, 0.002, 0.004])
    assert m.observations("steady_batch_size") == [3.0]
    assert m.observations("steady_inference_seconds") == [0.02]
    assert m.observations("steady_queue_seconds") == [0.001, 0.002, 0.004]


def test_live_and_shadow_counters_keep_their_flip_series() -> None:
    m = Metrics("memory")
    m.live_check("tiny", "1", "shift", flipped=False)
    m.live_check("tiny", "1", "shift", flipped=True)
    m.shadow("tiny", "1", "2", agreed=False)
    assert m.count("steady_live_checks", transform="shift") == 2.0
    assert m.count("steady_live_flips", transform="shift") == 1.0
    assert (m.count("steady_shadow_checks"), m.count("steady_shadow_agreements")) == (1.0, 0.0)


def test_served_publishes_info_and_robustness_gauges() -> None:
    m = Metrics("memory")
    m.served("tiny", "1", "production", "center", 224, "a" * 64, {"pan.p_change": 0.03, "note": "text"})
    assert m.gauge("steady_model_info", model="tiny", sha256="a" * 12) == 1.0
    assert m.gauge("steady_robustness_scored", model="tiny") == 1.0
    assert m.gauge("steady_robustness_pan_p_change", policy="center") == pytest.approx(0.03)
    assert m.gauge("steady_robustness_note") is None  # not a number: not a gauge
    m.served("tiny", "1", "production", "center", 224, "a" * 64, None, serving=False)
    assert m.gauge("steady_model_info", model="tiny") == 0.0


def test_robustness_names_and_backend_choice() -> None:
    assert robustness_metric_name("embed@0.5.p_change") == "steady_robustness_embed_0_5_p_change"
    with pytest.raises(ValueError):
        robustness_metric_name("@@")
    with pytest.raises(ValueError, match="backend"):
        Metrics("statsd")
