"""Steady's model core (card, repository, preprocessing, runtime) and its Ray Serve service.

Importing this package imports neither Ray nor torch.
"""

__all__: list[str] = []
