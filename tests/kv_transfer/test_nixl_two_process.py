"""Real NIXL pulls between two processes, in host memory (and GPU to GPU in the `gpu` variant):
the owner of the blocks (a prefill worker) runs in a spawned process, the reader (a decode worker)
in the test process, one agent per process as in deployment. Each test spawns one process, which
costs a few seconds of imports."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import pytest
import torch

pytest.importorskip("nixl")

from tandem.kv_transfer import KVRegion, KVTransferError, NixlKVAgent  # noqa: E402

# (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim): 1 KiB blocks of float32
OWNER_SHAPE = (12, 2, 2, 4, 2, 8)
READER_SHAPE = (10, 2, 2, 4, 2, 8)
OWNER_SEED = 1234
STARTUP_TIMEOUT_S = 60.0


def owner_kv_cache() -> torch.Tensor:
    return torch.randn(OWNER_SHAPE, generator=torch.Generator().manual_seed(OWNER_SEED))


def reader_device(device: str) -> str:
    # Across two GPUs when there are two, as a prefill and a decode worker would be.
    if device == "cuda" and torch.cuda.device_count() > 1:
        return "cuda:1"
    return "cuda:0" if device == "cuda" else "cpu"


def run_owner(
    device: str, to_reader: mp.Queue, from_reader: mp.Queue, wait_for_notifications_s: float
) -> None:
    """Register known contents, publish metadata, report the notifications received, and exit
    when the reader says so."""
    agent = NixlKVAgent("prefill-0", owner_kv_cache().to("cuda:0" if device == "cuda" else "cpu"))
    to_reader.put((agent.metadata(), agent.region.to_bytes()))
    notifications: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + wait_for_notifications_s
    while not notifications and time.monotonic() < deadline:
        notifications = agent.get_notifications()
        time.sleep(0.001)
    to_reader.put(notifications)
    from_reader.get(timeout=STARTUP_TIMEOUT_S)
    agent.close()


def start_owner(
    wait_for_notifications_s: float, device: str = "cpu"
) -> tuple[mp.Process, mp.Queue, mp.Queue]:
    ctx = mp.get_context("spawn")
    to_reader, from_reader = ctx.Queue(), ctx.Queue()
    args = (device, to_reader, from_reader, wait_for_notifications_s)
    owner = ctx.Process(target=run_owner, args=args, daemon=True)
    owner.start()
    return owner, to_reader, from_reader


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_read_non_consecutive_blocks_from_another_process(device: str) -> None:
    owner, from_owner, to_owner = start_owner(wait_for_notifications_s=30.0, device=device)
    try:
        metadata, region_bytes = from_owner.get(timeout=STARTUP_TIMEOUT_S)
        kv_cache = torch.zeros(READER_SHAPE, device=reader_device(device))
        with NixlKVAgent("decode-0", kv_cache, progress_thread=False, spare_block=9) as agent:
            agent.add_peer("prefill-0", metadata, KVRegion.from_bytes(region_bytes))
            warm_twice(agent, "prefill-0")
            handle = asyncio.run(
                agent.read_blocks("prefill-0", [3, 4, 5, 9], [0, 1, 2, 7], b"req-42", timeout_s=20)
            )
            notifications = from_owner.get(timeout=30)
            check_no_warming_while_pulling(agent, "prefill-0")
            to_owner.put("exit")
            agent.release(handle)  # already released by read_blocks: a no-op
            with pytest.raises(ValueError, match="already released"):
                agent.poll(handle)
        owner.join(timeout=30)
    finally:
        owner.kill()
    kv_cache = kv_cache.cpu()
    expected = owner_kv_cache()
    assert torch.equal(kv_cache[[0, 1, 2, 7]], expected[[3, 4, 5, 9]])
    assert torch.equal(kv_cache[9], expected[0])  # the spare block, where warming reads land
    assert torch.equal(kv_cache[8], expected[1])
    assert torch.count_nonzero(kv_cache[[3, 4, 5, 6]]) == 0
    assert (handle.num_blocks, handle.num_descriptors, handle.nbytes) == (4, 2, 4 * 1024)
    assert handle.xfer is None and handle.elapsed_s is not None
    assert notifications == [("decode-0", b"req-42")]  # warming READs notify nobody
    assert owner.exitcode == 0


def check_no_warming_while_pulling(agent: NixlKVAgent, peer: str) -> None:
    """Until a pull from the peer is released, warming it posts nothing."""
    pull = agent.start_read(peer, [1], [8], b"req-43")
    deadline = time.monotonic() + 20
    while agent.poll(pull) != "DONE":
        assert time.monotonic() < deadline, "the pull never finished"
    for _ in range(5):
        assert not agent.warm(peer)
        time.sleep(0.01)  # a warming READ still moving from before has finished by now
    agent.release(pull)
    warm_twice(agent, peer)


def warm_twice(agent: NixlKVAgent, peer: str) -> None:
    """Warm until a second READ is posted, so the first has finished."""
    assert agent.warm(peer)
    deadline = time.monotonic() + 20
    while not agent.warm(peer):
        assert time.monotonic() < deadline, "the warming READ never finished"
        time.sleep(0.001)


def test_read_from_a_peer_that_is_gone_raises() -> None:
    owner, from_owner, to_owner = start_owner(wait_for_notifications_s=0.0)
    kv_cache = torch.zeros(READER_SHAPE)
    try:
        metadata, region_bytes = from_owner.get(timeout=STARTUP_TIMEOUT_S)
        region = KVRegion.from_bytes(region_bytes)
        assert from_owner.get(timeout=30) == []
        with NixlKVAgent("decode-0", kv_cache, progress_thread=False, spare_block=9) as agent:
            agent.add_peer("prefill-0", metadata, region)
            to_owner.put("exit")
            owner.join(timeout=30)
            assert owner.exitcode == 0
            # UCX sees the peer's connection drop, so this fails at once rather than timing out.
            with pytest.raises(KVTransferError, match="req-7"):
                asyncio.run(agent.read_blocks("prefill-0", [0, 1], [0, 1], b"req-7", timeout_s=5))
            with pytest.raises(KVTransferError, match="warming the path to prefill-0"):
                for _ in range(100):  # posting may succeed before UCX notices the peer is gone
                    agent.warm("prefill-0")
                    time.sleep(0.01)
            agent.remove_peer("prefill-0")
            with pytest.raises(KVTransferError, match="is the peer running"):
                agent.add_peer("prefill-0", metadata, region)
            assert agent.peer_names == []
    finally:
        owner.kill()
    assert torch.count_nonzero(kv_cache) == 0
