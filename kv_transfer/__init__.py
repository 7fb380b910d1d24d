"""tandem.kv_transfer: moving KV-cache blocks between workers with NIXL (DESIGN.md, step 4).

`descriptors` and `region` are pure (block ids to descriptors, the wire form of a KV region);
`nixl_connector` holds the NIXL agent. NIXL itself is imported only when an agent is created, so
this package imports on machines without it.
"""

from tandem.kv_transfer.descriptors import coalesce_block_runs, dst_descriptors, src_descriptors
from tandem.kv_transfer.nixl_connector import KVReadHandle, KVTransferError, NixlKVAgent
from tandem.kv_transfer.region import KVRegion

__all__ = [
    "KVReadHandle",
    "KVRegion",
    "KVTransferError",
    "NixlKVAgent",
    "coalesce_block_runs",
    "dst_descriptors",
    "src_descriptors",
]
