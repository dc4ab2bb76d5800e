"""Keeps the experiment tests inside the repository and their temporary folders."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cifar10_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """A decoded-image cache per test, never ``~/.cache/proxoptim``: a test that loads
    CIFAR-10 without ``cache_dir`` writes into a temporary folder (tests that check the
    variable itself set it again)."""
    monkeypatch.setenv("PROXOPTIM_CACHE", str(tmp_path_factory.mktemp("proxoptim_cache")))
