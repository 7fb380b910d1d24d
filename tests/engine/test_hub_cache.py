"""Hub ids resolve to snapshots in the local Hugging Face cache, never through a download."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import constants

from tandem.engine.hub_cache import is_hub_id, resolve_model_dir
from tandem.engine.model_info import describe_model
from tests.checkpoints import make_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_with(tmp_path, repo_id: str, checkpoint) -> object:
    """A cache laid out as huggingface_hub writes it: refs/main names the snapshot."""
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any attempt to connect would fail
    return tmp_path


def test_hub_id_shapes():
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not is_hub_id("random:tiny") and not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c") and not is_hub_id("plain")


def test_a_cached_hub_id_describes_its_snapshot(hub_cache, tmp_path):
    checkpoint = make_checkpoint("qwen3", tmp_path / "ckpt")
    snapshot = _cache_with(hub_cache, "acme/tiny-qwen3", checkpoint)
    assert resolve_model_dir("acme/tiny-qwen3") == snapshot
    info = describe_model("acme/tiny-qwen3")
    assert info.name == "acme/tiny-qwen3" and info.model_dir == snapshot
    assert info.config.vocab_size > 0


def test_an_uncached_hub_id_says_how_to_fetch_it(hub_cache):
    with pytest.raises(ValueError) as err:
        describe_model("Qwen/Qwen3-0.6B")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert "hf download Qwen/Qwen3-0.6B" in message
    assert "huggingface-cli download Qwen/Qwen3-0.6B" in message


def test_neither_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="neither a directory, a Hugging Face Hub id"):
        resolve_model_dir(str(tmp_path / "missing" / "deeper"))
