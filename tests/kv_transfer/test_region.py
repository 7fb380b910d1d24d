"""KVRegion: built from a tensor, and its JSON wire form (never pickle)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from tandem.kv_transfer.region import KVRegion


def test_from_tensor() -> None:
    kv_cache = torch.zeros(5, 2, 2, 4, 2, 8)  # (num_blocks, num_layers, 2, block_size, heads, dim)
    region = KVRegion.from_tensor(kv_cache)
    assert region == KVRegion(
        base_addr=kv_cache.data_ptr(), block_nbytes=2 * 2 * 4 * 2 * 8 * 4, num_blocks=5, dev_id=0,
        mem_type="DRAM",
    )
    assert region.total_nbytes == 5 * 1024


def test_from_tensor_rejects_non_contiguous_and_empty() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        KVRegion.from_tensor(torch.zeros(4, 3, 8).transpose(0, 1))
    with pytest.raises(ValueError, match="no blocks"):
        KVRegion.from_tensor(torch.zeros(0, 3, 8))


def test_to_bytes_is_plain_json() -> None:
    region = KVRegion(base_addr=4096, block_nbytes=1024, num_blocks=5, dev_id=1, mem_type="VRAM")
    assert region.to_bytes() == (
        b'{"base_addr": 4096, "block_nbytes": 1024, "dev_id": 1, '
        b'"format": "tandem.kv_region.v1", "mem_type": "VRAM", "num_blocks": 5}'
    )
    assert KVRegion.from_bytes(region.to_bytes()) == region


def _encoded(**changes: object) -> bytes:
    fields = {"format": "tandem.kv_region.v1", "base_addr": 4096, "block_nbytes": 1024,
              "num_blocks": 5, "dev_id": 0, "mem_type": "DRAM", **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pickle.dumps({"base_addr": 4096}), "not a KVRegion encoding"),
        (b"\xff\xfe", "not a KVRegion encoding"),
        (b"[1, 2]", "JSON object"),
        (_encoded(format="tandem.kv_region.v0"), "format"),
        (_encoded(num_blocks=None), "fields"),
        (_encoded(extra=1), "fields"),
        (_encoded(num_blocks=True), "must be an int"),
        (_encoded(block_nbytes="1024"), "must be an int"),
        (_encoded(block_nbytes=0), "at least one block"),
        (_encoded(base_addr=0), "positive address"),
        (_encoded(base_addr=2**64 - 1024), "64-bit address space"),
        (_encoded(dev_id=-1), "dev_id"),
        (_encoded(mem_type="FILE"), "mem_type"),
        (b" " * 5000, "under 4096 bytes"),
    ],
)
def test_from_bytes_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KVRegion.from_bytes(data)
