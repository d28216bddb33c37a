"""Application builders: the one place a Ray Serve application is assembled from settings.

``serve deploy deploy/serve.yaml`` and KubeRay reach the application through the import
path ``service.app:build_app`` with ``args: {repo: ..., config: ...}`` (plus any setting as
an extra arg); ``steady serve`` and the tests call :func:`application` directly.

Example:
    >>> serve.run(application(ServeSettings.build(repo="/models")), name="steady")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Mapping

from service.settings import ServeSettings

__all__ = ["application", "build_app"]


def application(settings: ServeSettings) -> Any:
    """The bound Ray Serve application for ``settings``."""
    from service.deployment import SteadyServer

    return SteadyServer.options(**settings.deployment_options()).bind(settings.to_dict())


def build_app(args: Mapping[str, Any]) -> Any:
    """Import-path builder for ``serve run``/``serve deploy``: ``args`` = {repo, config?, <setting>: value...}."""
    args = dict(args)
    repo = args.pop("repo", None)
    config = args.pop("config", None)
    settings = ServeSettings.build(repo, config=config, overrides=args)
    return application(settings)
