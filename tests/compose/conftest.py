"""Fixtures for the deployment tests: the Dockerfile's install, built once per session."""

from __future__ import annotations

import pytest

from .imagevenv import ImageVenv, build_image_venv


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """A fresh venv holding what the image's /opt/trio-shard-gateway/venv holds (see `imagevenv`)."""
    return build_image_venv(tmp_path_factory.mktemp("image"))
