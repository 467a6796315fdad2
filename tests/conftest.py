"""Shared fixtures: the real data beside the repository, headless Qt, small torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# What the command line does first, before torch loads: OpenMP threads that spin on shared
# cores make tests several times slower; PROJ's data where a venv hides it.
from kdmsi_engine.environment import configure_process  # noqa: E402

configure_process()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real change-detection data (CI has it beside the clone)."""
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"real test data not found at {SHARED_DATA}; see the README")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(autouse=True, scope="session")
def _small_torch() -> None:
    """Tests run on 2 cores: keep torch to them and deterministic where it can be."""
    try:
        import torch
    except ImportError:  # plugin tests may run without torch
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
