"""The core every part of Steady shares: what a model version is and how it is fed.

- :mod:`service.core.card` — the frozen model card (preprocessing travels with the model).
- :mod:`service.core.repository` — versioned, checksummed model folders; stages; the one reader of
  sha-bound JSON files.
- :mod:`service.core.boxes` — boxes, their geometry and the one resampling of a box.
- :mod:`service.core.preprocess` — the one preprocessing implementation (decode, policy box, tensor).
- :mod:`service.core.localize` — centred-object rescaling (the ``object`` policy's box).
- :mod:`service.core.ensemble` — the shift ensemble on top of a policy (copies, margin rule, mean softmax).
- :mod:`service.core.runtime` — ONNX Runtime sessions.
- :mod:`service.core.errors` — every domain error, with its HTTP status and exit code.
- :mod:`service.core.images` — which files are images.

No Ray, no HTTP, no torch: exporters, the scorer and the server import these.
"""

__all__: list[str] = []
