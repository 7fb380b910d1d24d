"""Which step shapes `tandem profile` measures, and which of them fit the engine at hand.

The grids are geometric where the time changes shape (the prefill knee where reading the weights
stops dominating, the decode batch buckets of the CUDA graphs) and reach the limits serving meets:
the context length for cached prefixes, the KV memory for decode contexts, 256 sequences a batch.
For each batch size, decode also gets one point at the largest context that fills the KV cache, so
the model never extrapolates towards the memory limit. Mixed points reach decode contexts past the
decode kernel's split threshold (engine/kernels, 8192 tokens), where a mixed step's decode rows
change kernel configuration. The CPU grids are small: a CPU profile serves tests and the pure-CPU
path, not capacity figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Repeats:
    """Decode: steps of one placed batch. Prefill and mixed: passes over the whole grid."""
    warmup: int          # run first and discarded (kernel compilation, caches)
    min_timed: int       # the median is over at least this many,
    max_timed: int       # and up to this many while their total time stays under budget_s
    budget_s: float = 0.5

    @property
    def max_steps(self) -> int:
        return self.warmup + self.max_timed


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    prefill_new_tokens: tuple[int, ...]
    prefill_cached_tokens: tuple[int, ...]
    decode_batch_sizes: tuple[int, ...]
    decode_context_tokens: tuple[int, ...]    # per sequence
    mixed_new_tokens: tuple[int, ...]
    mixed_cached_tokens: tuple[int, ...]
    mixed_batch_sizes: tuple[int, ...]
    mixed_context_tokens: tuple[int, ...]     # per decode sequence
    repeats: dict[str, Repeats] = field(default_factory=dict)
    transfer_max_blocks: int = 1024
    decode_fill_fraction: float = 0.9         # of the KV cache, for the memory-limit point

    @property
    def max_step_tokens(self) -> int:
        """The engine's step token budget: room for the largest chunk beside its decode batch."""
        return max(max(self.prefill_new_tokens),
                   max(self.mixed_new_tokens) + max(self.mixed_batch_sizes))


def default_grid(device_type: str, quick: bool = False) -> ProfileGrid:
    if quick:
        return ProfileGrid(
            prefill_new_tokens=(16, 64, 128), prefill_cached_tokens=(0, 256),
            decode_batch_sizes=(1, 4), decode_context_tokens=(32, 128),
            mixed_new_tokens=(32, 64), mixed_cached_tokens=(0,), mixed_batch_sizes=(2, 4),
            mixed_context_tokens=(64,),
            repeats={"prefill": Repeats(1, 3, 3), "decode": Repeats(1, 3, 3),
                     "mixed": Repeats(1, 3, 3)},
            transfer_max_blocks=16)
    if device_type == "cuda":
        return ProfileGrid(
            prefill_new_tokens=(16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                                6144, 8192),
            prefill_cached_tokens=(0, 1024, 4096, 16384, 65536),
            decode_batch_sizes=(1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256),
            decode_context_tokens=(128, 512, 2048, 8192, 32768),
            mixed_new_tokens=(128, 512, 2048), mixed_cached_tokens=(0, 4096),
            mixed_batch_sizes=(8, 64, 192), mixed_context_tokens=(1024, 4096, 16384),
            repeats={"prefill": Repeats(1, 3, 5, 45.0), "decode": Repeats(2, 8, 8),
                     "mixed": Repeats(1, 3, 5, 20.0)})
    return ProfileGrid(
        prefill_new_tokens=(16, 32, 64, 128, 256, 512, 1024), prefill_cached_tokens=(0, 1024, 3072),
        decode_batch_sizes=(1, 2, 4, 8, 16, 32, 64), decode_context_tokens=(64, 256, 1024),
        mixed_new_tokens=(64, 256), mixed_cached_tokens=(0, 1024), mixed_batch_sizes=(4, 16),
        mixed_context_tokens=(256,),
        repeats={"prefill": Repeats(1, 3, 5, 10.0), "decode": Repeats(1, 5, 5),
                 "mixed": Repeats(1, 3, 5, 5.0)},
        transfer_max_blocks=256)


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def plan_points(grid: ProfileGrid, num_kv_blocks: int, block_size: int, max_model_len: int,
                max_num_seqs: int) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, arguments) of every grid point that fits: KV blocks, context length, batch limit."""
    points: list[tuple[str, tuple[int, ...]]] = []
    for cached in grid.prefill_cached_tokens:
        for new in grid.prefill_new_tokens:
            if cached + new < max_model_len and _blocks(cached + new + 1, block_size) \
                    <= num_kv_blocks:
                points.append(("prefill", (new, cached)))
    # StepProbe.decode: one step more than it times, and one position reserved ahead
    decode_steps = grid.repeats["decode"].max_steps + 2
    for batch in grid.decode_batch_sizes:
        if batch > max_num_seqs:
            continue
        fits = [c for c in grid.decode_context_tokens
                if _decode_fits(batch, c, decode_steps, num_kv_blocks, block_size, max_model_len)]
        fill = _fill_context(grid, batch, decode_steps, num_kv_blocks, block_size, max_model_len)
        if fill > 0 and (not fits or fill >= 1.25 * fits[-1]):
            fits.append(fill)
        points.extend(("decode", (batch, c)) for c in fits)
    # a decode batch of a mixed group steps once per chunk of its group, in each pass
    mixed_steps = len(grid.mixed_new_tokens) * len(grid.mixed_cached_tokens)
    for batch in grid.mixed_batch_sizes:
        for context in grid.mixed_context_tokens:
            for cached in grid.mixed_cached_tokens:
                for new in grid.mixed_new_tokens:
                    prefill_blocks = _blocks(cached + new + 1, block_size)
                    if batch + 1 <= max_num_seqs and cached + new < max_model_len and \
                            _decode_fits(batch, context, mixed_steps,
                                         num_kv_blocks - prefill_blocks, block_size,
                                         max_model_len):
                        points.append(("mixed", (new, cached, batch, context)))
    return points


def _decode_fits(batch: int, context: int, steps: int, num_kv_blocks: int, block_size: int,
                 max_model_len: int) -> bool:
    final = context + steps + 1  # tokens each sequence holds after the last timed step
    return final < max_model_len and batch * _blocks(final, block_size) <= num_kv_blocks


def _fill_context(grid: ProfileGrid, batch: int, steps: int, num_kv_blocks: int, block_size: int,
                  max_model_len: int) -> int:
    """The per-sequence context at which batch sequences fill decode_fill_fraction of the cache."""
    blocks_each = int(grid.decode_fill_fraction * num_kv_blocks) // batch
    context = min(blocks_each * block_size, max_model_len) - steps - 2
    return context if context > 0 and _decode_fits(batch, context, steps, num_kv_blocks,
                                                   block_size, max_model_len) else 0
