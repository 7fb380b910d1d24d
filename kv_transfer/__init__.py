"""tandem.kv_transfer: moving KV-cache blocks between workers with NIXL (DESIGN.md, step 4).

`descriptors` and `region` are pure: a KV tensor's blocks as NIXL descriptors with the checks of a
pull's block ids, and the wire form of where a worker's blocks live. `nixl_connector` holds the
NIXL agent that registers a KV tensor and pulls blocks from peers; `read_handle` is what a pull
returns. NIXL itself is imported only when an agent is created, so this package imports on machines
without it.
"""

from tandem.kv_transfer.descriptors import block_descriptors, check_block_pairs, count_runs
from tandem.kv_transfer.nixl_connector import NixlKVAgent
from tandem.kv_transfer.read_handle import KVReadHandle, KVTransferError, TransferState
from tandem.kv_transfer.region import KVRegion

__all__ = [
    "KVReadHandle",
    "KVRegion",
    "KVTransferError",
    "NixlKVAgent",
    "TransferState",
    "block_descriptors",
    "check_block_pairs",
    "count_runs",
]
