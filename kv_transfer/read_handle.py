"""What a KV pull hands its caller: the handle of one READ, and the error of a failed one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tandem.kv_transfer.descriptors import count_runs

# NIXL's transfer states: finished, still moving, failed.
TransferState = Literal["DONE", "PROC", "ERR"]


class KVTransferError(RuntimeError):
    """A pull failed, timed out, or the agent is closed; the caller recomputes the prompt instead.

    `in_flight` is True when NIXL could not cancel a READ that had not finished (after a timeout):
    its destination blocks may still be written, so they must not be handed to another request.
    """

    def __init__(self, message: str, *, in_flight: bool = False) -> None:
        super().__init__(message)
        self.in_flight = in_flight


@dataclass(slots=True)
class KVReadHandle:
    """One posted READ from `peer_name`: its `remote_block_ids[k]` into our `local_block_ids[k]`.
    `xfer` is NIXL's handle, None once released; `started_s` (before the READ was built),
    `posted_s` (once handed to NIXL) and `finished_s` are `time.perf_counter()` readings."""

    peer_name: str
    request_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]
    nbytes: int
    started_s: float
    xfer: Any
    posted_s: float | None = None
    finished_s: float | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.local_block_ids)

    @property
    def num_descriptors(self) -> int:
        """Descriptors NIXL moves once consecutive pairs merge; counted on demand, off the pull's
        path."""
        return count_runs(self.remote_block_ids, self.local_block_ids)

    @property
    def elapsed_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.started_s
