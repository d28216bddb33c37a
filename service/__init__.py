"""Steady's service: the model core (:mod:`service.core`), the Ray Serve application around it, and the CLI.

- :mod:`service.core` — card, repository, boxes, preprocessing, localiser, runtime, errors, image files:
  what exporters, robustness and serving share. No Ray, no HTTP, no torch.
- :mod:`service.settings` (typed settings), :mod:`service.catalog` (served versions, load and reload),
  :mod:`service.dataplane` (validation, routing, side traffic), :mod:`service.routes` (HTTP),
  :mod:`service.v2` (KServe V2 codec), :mod:`service.metrics` (every Prometheus metric),
  :mod:`service.deployment` (the thin Ray Serve deployment), :mod:`service.app` (application builders),
  :mod:`service.runner` (Ray and Serve in this process), :mod:`service.launcher` (``steady serve`` as a child).
- :mod:`service.cli` — the ``steady`` command: the one entry module, on top of every package.

Importing this package imports neither Ray nor torch.
"""

__all__: list[str] = []
