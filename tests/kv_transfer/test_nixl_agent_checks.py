"""NixlKVAgent's argument checks and peer bookkeeping. The agents share this process but never
transfer (that is what test_nixl_two_process does), so this stays fast."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl")

from tandem.kv_transfer import KVRegion, KVTransferError, NixlKVAgent  # noqa: E402

BLOCK_SHAPE = (2, 2, 4, 2, 8)  # (num_layers, 2, block_size, num_kv_heads, head_dim): 1 KiB fp32


@pytest.fixture(scope="module")
def agents() -> Iterator[tuple[NixlKVAgent, NixlKVAgent]]:
    owner = NixlKVAgent("checks-owner", torch.zeros(12, *BLOCK_SHAPE))
    reader = NixlKVAgent("checks-reader", torch.zeros(10, *BLOCK_SHAPE), spare_block=9)
    reader.add_peer(owner.name, owner.metadata(), owner.region)
    yield owner, reader
    reader.close()
    owner.close()


def test_add_peer_is_idempotent(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, reader = agents
    region = KVRegion.from_bytes(owner.region.to_bytes())
    reader.add_peer(owner.name, owner.metadata(), region)
    assert reader.peer_names == [owner.name]


def test_add_peer_rejects_wrong_name_and_keeps_the_peer(
    agents: tuple[NixlKVAgent, NixlKVAgent],
) -> None:
    owner, reader = agents
    with pytest.raises(ValueError, match="belongs to agent 'checks-owner'"):
        reader.add_peer("someone-else", owner.metadata(), owner.region)
    with pytest.raises(ValueError, match="cannot add itself"):
        reader.add_peer(reader.name, reader.metadata(), reader.region)
    assert reader.peer_names == [owner.name]


def test_add_peer_rejects_other_block_size(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, reader = agents
    region = KVRegion(owner.region.base_addr, 2048, 6, 0, "DRAM")
    with pytest.raises(ValueError, match="2048-byte KV blocks but this worker has 1024-byte"):
        reader.add_peer("other-model", owner.metadata(), region)


def test_add_peer_rejects_garbage_metadata(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, reader = agents
    with pytest.raises(KVTransferError, match="could not load the metadata of peer 'garbage'"):
        reader.add_peer("garbage", b"not nixl metadata", owner.region)
    assert reader.peer_names == [owner.name]


@pytest.mark.parametrize(
    ("peer", "remote_ids", "local_ids", "notify", "message"),
    [
        ("nobody", [0], [0], b"r", "unknown peer 'nobody': call add_peer first"),
        ("checks-owner", [12], [0], b"r", r"remote \(checks-owner\) block id 12 is out of range"),
        ("checks-owner", [0], [10], b"r", "local block id 10 is out of range"),
        ("checks-owner", [0, 1], [0], b"r", "2 source ids and 1 destination ids"),
        ("checks-owner", [], [], b"r", "empty"),
        ("checks-owner", [0], [0], b"", "request id as non-empty bytes"),
        ("checks-owner", [0], [0], "r", "request id as non-empty bytes"),
    ],
)
def test_start_read_rejects(
    agents: tuple[NixlKVAgent, NixlKVAgent],
    peer: str, remote_ids: list[int], local_ids: list[int], notify: bytes, message: str,
) -> None:
    _, reader = agents
    with pytest.raises(ValueError, match=message):
        reader.start_read(peer, remote_ids, local_ids, notify)


def test_read_blocks_rejects_non_positive_timeout(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, reader = agents
    with pytest.raises(ValueError, match="timeout_s"):
        asyncio.run(reader.read_blocks(owner.name, [0], [0], b"r", timeout_s=0))


def test_warm_rejects_an_unknown_peer(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    _, reader = agents
    with pytest.raises(ValueError, match="unknown peer 'nobody'"):
        reader.warm("nobody")


def test_warm_needs_a_spare_block(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, _ = agents
    with pytest.raises(ValueError, match="no spare block"):
        owner.warm("checks-reader")
    with pytest.raises(ValueError, match="spare_block 10 is not a block"):
        NixlKVAgent("checks-bad-spare", torch.zeros(10, *BLOCK_SHAPE), spare_block=10)


def test_remove_unknown_peer_is_a_no_op(agents: tuple[NixlKVAgent, NixlKVAgent]) -> None:
    owner, reader = agents
    reader.remove_peer("nobody")
    assert reader.peer_names == [owner.name]
    assert owner.get_notifications() == []


def test_closed_agent_refuses_work() -> None:
    agent = NixlKVAgent("checks-closed", torch.zeros(2, *BLOCK_SHAPE))
    agent.close()
    agent.close()
    with pytest.raises(KVTransferError, match="is closed"):
        agent.metadata()


def test_add_peer_rejects_a_region_larger_than_registered(
    agents: tuple[NixlKVAgent, NixlKVAgent],
) -> None:
    owner, reader = agents
    too_big = KVRegion(owner.region.base_addr, owner.region.block_nbytes, 40, 0, "DRAM")
    try:
        with pytest.raises(KVTransferError, match="could not prepare the blocks of peer"):
            reader.add_peer(owner.name, owner.metadata(), too_big)
        assert reader.peer_names == []
    finally:
        reader.add_peer(owner.name, owner.metadata(), owner.region)
    assert reader.peer_names == [owner.name]
