"""Fixtures of the deploy tests: the session's real Steady service (one Ray per session).

``tests/service/conftest.py`` defines the ``service`` fixture; importing it here registers it for
this folder too (pytest collects fixture functions from a conftest's namespace). pytest then holds
two definitions, each with its own session cache, so when ``tests/deploy`` and ``tests/service``
run together the fixture itself makes sure only one Ray starts: the second definition to run
reuses the running service. Once the fixture lives in ``tests/conftest.py`` (visible to every
folder, defined once), this import can go.
"""

from __future__ import annotations

from tests.service.conftest import service  # noqa: F401  (fixture re-export)
