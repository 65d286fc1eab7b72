"""Shared fixtures. Built-in models are generated into a per-session cache directory, so
tests never depend on (or write to) the user's ~/.cache/trtserve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from engines import models

# CI explores the same examples every run, so a red run means a change, not a new seed;
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trtserve-cache")


@pytest.fixture(scope="session")
def tiny(cache_dir: Path) -> models.ModelSource:
    return models.resolve("tiny", cache_dir)


@pytest.fixture(scope="session")
def resnet50(cache_dir: Path) -> models.ModelSource:
    return models.resolve("resnet50", cache_dir)
