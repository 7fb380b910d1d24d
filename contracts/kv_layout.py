"""The KV-cache layout every worker shares, and its version.

One tensor per worker of shape `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`:
one block is one contiguous region holding K and V of every layer, so one NIXL descriptor moves one
block and runs of consecutive block ids coalesce into one descriptor. A prefill worker's KV handle
carries `KV_LAYOUT_VERSION`; a decode worker refuses to pull from a peer whose version differs.
"""

from __future__ import annotations

KV_LAYOUT_VERSION = 1  # bumped whenever the KV tensor layout changes; peers must agree

