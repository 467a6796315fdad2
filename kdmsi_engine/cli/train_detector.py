"""`kdmsi train-detector` (placeholder until its owner replaces it)."""

from __future__ import annotations


def register(subparsers, common) -> None:  # noqa: ARG001
    """Not registered yet."""
