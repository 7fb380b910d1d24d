"""The kernels the model calls, chosen by where the tensors live.

CUDA tensors go to the Triton kernels in engine/kernels/; everything else runs the torch reference
paths (engine/attention.py, engine/layers.py), which are also what the kernels are tested against.
The choice is made inside engine/kernels/, per call.
"""

from __future__ import annotations

from tandem.engine.kernels import (PartialSums, linear, paged_attention, prepare_and_attend,
                                   prepare_qkv, rms_norm, silu_and_mul, swiglu)

__all__ = ["PartialSums", "linear", "paged_attention", "prepare_and_attend", "prepare_qkv",
           "rms_norm", "silu_and_mul", "swiglu"]
