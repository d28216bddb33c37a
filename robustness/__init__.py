"""Shift/scale robustness scoring, the promotion gate, and their reports. Imports no torch."""

__all__: list[str] = []
