"""Steady's benchmarks, in one home: ``steady bench score`` (:mod:`benchmarks.score`), ``steady bench serve``
(:mod:`benchmarks.serve`), and scripts run with ``python -m benchmarks.<name>`` (:mod:`benchmarks.accuracy`,
:mod:`benchmarks.gpu`). Speed targets live here, never in timed tests.
"""

__all__: list[str] = []
