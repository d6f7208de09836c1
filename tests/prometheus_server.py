"""A private Prometheus for tests: free port, temporary storage, 1 s scrapes of given targets.

The implementation lives in ``dashboards/prom.py`` (``dashboards/render.py --demo`` uses it
too); this module adds what tests need on top: a missing binary FAILS the test with an install
hint (CI installs prometheus), it never skips.
"""

from __future__ import annotations

import pytest

from dashboards.prom import (
    PrometheusError,
    PrometheusNotFound,
    PrometheusServer,
    find_prometheus,
)

__all__ = ["PrometheusError", "PrometheusServer", "prometheus_binary"]


def prometheus_binary() -> str:
    """The prometheus binary; a missing one fails the test (Debian: apt-get install prometheus)."""
    try:
        return find_prometheus()
    except PrometheusNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
