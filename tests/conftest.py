"""Shared pytest set-up: `gpu` tests run only where CUDA is available; servers that tests start
share one internal secret the tests know (tests/internal_secret.py)."""

from __future__ import annotations

import os
import secrets

import pytest

os.environ.setdefault("TANDEM_INTERNAL_SECRET", secrets.token_urlsafe(32))


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
