"""Fixtures of the exporter tests. torch is imported only by the tests that need it."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def small_net() -> Any:
    """A small eval-mode ``nn.Module`` with shape-dependent TF-"SAME" padding (see small_models)."""
    pytest.importorskip("torch", reason="needs torch (the 'export' extra)")
    from tests.exporters.small_models import make_small_net

    return make_small_net()
