"""PyTorch (and ONNX) to a verified, carded model version in the repository. Needs the ``export`` extra."""

__all__: list[str] = []
