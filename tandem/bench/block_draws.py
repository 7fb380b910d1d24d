"""Token ids of a trace's blocks: for each hash id, what `numpy.random.default_rng([seed, 3, id])`
draws with `random_token_ids`, made several times faster (tandem/bench/trace.py uses it).

A whole trace has about 180k distinct hash ids. Building a generator for each cost 26 us, most of
it numpy's SeedSequence mixing the seed into PCG64's starting state in a Python-level loop. Here
that mixing (SeedSequence's hash pool, then PCG64's seeding step) is done for all ids at once in
numpy, and one generator is set to each id's state in turn: the same bit generator state, so the
same ids, bit for bit (tests/bench/test_trace.py compares them with default_rng). Ids that do not
fit a single 32-bit entropy word, or a negative seed, take the plain default_rng path.

The draws themselves are made for a batch of ids at once as well. For a range under 2**32 - 1,
`Generator.integers` draws by Lemire's method on the bit generator's 32-bit stream (each 64-bit
output gives its low half, then its high half): a 32-bit word w gives `low + (w * span) >> 32`,
unless `(w * span) mod 2**32` falls under `(2**32 - span) % span`, when numpy rejects w and
draws again. So each id's raw 64-bit outputs are read (`random_raw`) and turned into ids for the
whole batch in a few numpy passes; an id whose draws hit a rejection (a chance of about 3e-8 per
token id for a vocabulary of 2,000) is drawn by `integers` instead. That costs a third less per
id than a call to `integers` each, whose fixed overhead (a `numpy.prod` of the size, among
others) was most of the call.

The drawn ids are mapped to the vocabulary's own int objects through an object array, one C-level
take instead of `operator.itemgetter(*ids)` (the reason for shared int objects is in
tandem/bench/datasets.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

from tandem.bench.datasets import FIRST_ORDINARY_TOKEN_ID, random_token_ids

# numpy's SeedSequence constants (numpy/random/bit_generator.pyx) and PCG64's multiplier.
_MASK32 = 0xFFFF_FFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_POOL_SIZE = 4
_PCG_MULTIPLIER = (2549297995355413924 << 64) + 4865540595714422341
_MASK128 = (1 << 128) - 1
_STREAM = 3  # the middle entropy word: keeps trace draws apart from other seeded draws
_DRAW_BATCH = 256  # ids drawn per vectorised pass: 4 MB of words for 512-token blocks, in cache


class BlockTokens:
    """Token ids for each hash id, drawn once from the generator seeded by (seed, 3, id)."""

    def __init__(self, seed: int, tokens_per_block: int, vocab_size: int) -> None:
        self._seed = seed
        self._tokens_per_block = tokens_per_block
        self._vocab_size = vocab_size
        self._vocabulary = np.array(range(vocab_size), dtype=object)
        self._states: dict[int, tuple[int, int]] = {}
        self._cache: dict[int, list[int]] = {}
        self._bit_generator = np.random.PCG64(0)
        self._generator = np.random.Generator(self._bit_generator)
        # Lemire's method needs the range under 2**32 - 1 (numpy takes other paths for 1 and
        # 2**32) and the 32-bit words in stream order, which a little-endian view gives.
        span = vocab_size - FIRST_ORDINARY_TOKEN_ID
        self._span = span if 1 < span < _MASK32 and sys.byteorder == "little" else None

    def prepare(self, hash_ids: Iterable[int]) -> None:
        """Seed the generators of these ids in one vectorised pass and draw their tokens in
        batches (ids not prepared are seeded and drawn one by one)."""
        if self._seed < 0 or self._tokens_per_block < 2:
            return
        ids = [h for h in dict.fromkeys(hash_ids) if 0 <= h <= _MASK32 and h not in self._cache]
        if not ids:
            return
        states = pcg64_states(_entropy_words(self._seed), ids)
        if self._span is None:
            self._states.update(zip(ids, states))
            return
        for start in range(0, len(ids), _DRAW_BATCH):
            self._draw_batch(ids[start:start + _DRAW_BATCH], states[start:start + _DRAW_BATCH])

    def tokens(self, hash_id: int) -> list[int] | tuple[int, ...]:
        cached = self._cache.get(hash_id)
        if cached is None:
            state = self._states.pop(hash_id, None)
            if state is None:
                rng = np.random.default_rng([self._seed, _STREAM, hash_id])
                cached = random_token_ids(rng, self._tokens_per_block, self._vocab_size)
            else:
                cached = self._draw(state)
            self._cache[hash_id] = cached
        return cached

    def _draw(self, state: tuple[int, int]) -> list[int]:
        self._set_state(state)
        drawn = self._generator.integers(FIRST_ORDINARY_TOKEN_ID, self._vocab_size,
                                         size=self._tokens_per_block)
        return self._vocabulary[drawn].tolist()

    def _draw_batch(self, ids: list[int], states: list[tuple[int, int]]) -> None:
        """What `_draw` gives each id, by Lemire's method over the batch (the module docstring)."""
        count, span = self._tokens_per_block, self._span
        raw = np.empty((len(ids), (count + 1) // 2), dtype=np.uint64)
        for row, state in zip(raw, states):
            self._set_state(state)
            row[:] = self._bit_generator.random_raw(raw.shape[1])
        words = raw.view(np.uint32)[:, :count]  # (ids, count), each row in stream order
        rejected = ((words * np.uint32(span)) < (2**32 - span) % span).any(axis=1)
        drawn = (words.astype(np.uint64) * np.uint64(span)) >> np.uint64(32)
        drawn += np.uint64(FIRST_ORDINARY_TOKEN_ID)
        rows = self._vocabulary[drawn].tolist()
        for hash_id, state, tokens, is_rejected in zip(ids, states, rows, rejected.tolist()):
            if is_rejected:
                self._states[hash_id] = state  # numpy draws again there: tokens() draws it whole
            else:
                self._cache[hash_id] = tokens

    def _set_state(self, state: tuple[int, int]) -> None:
        self._bit_generator.state = {"bit_generator": "PCG64",
                                     "state": {"state": state[0], "inc": state[1]},
                                     "has_uint32": 0, "uinteger": 0}


def pcg64_states(seed_words: list[int], hash_ids: list[int]) -> list[tuple[int, int]]:
    """PCG64's (state, inc) after seeding from SeedSequence([*seed_words, 3, id]) for each id:
    numpy's own algorithm, in uint32 arithmetic over all ids at once."""
    count = len(hash_ids)
    entropy = [np.full(count, word, dtype=np.uint32) for word in (*seed_words, _STREAM)]
    entropy.append(np.asarray(hash_ids, dtype=np.uint32))
    pool = _mix_entropy(entropy, count)
    words = _generate_state(pool, 8)  # 4 uint64 words, each as (low, high) uint32
    halves = [(words[2 * k].astype(np.uint64)
               | (words[2 * k + 1].astype(np.uint64) << np.uint64(32))).tolist()
              for k in range(4)]
    states = []
    for seed_high, seed_low, inc_high, inc_low in zip(*halves):
        # pcg_setseq_128_srandom_r: state 0, one step, add the initial state, one more step.
        inc = ((((inc_high << 64) | inc_low) << 1) | 1) & _MASK128
        state = (inc + ((seed_high << 64) | seed_low)) & _MASK128
        states.append(((state * _PCG_MULTIPLIER + inc) & _MASK128, inc))
    return states


def _entropy_words(value: int) -> list[int]:
    """An int as SeedSequence splits it: 32-bit words, least significant first."""
    words = [value & _MASK32]
    value >>= 32
    while value:
        words.append(value & _MASK32)
        value >>= 32
    return words


class _HashMix:
    """SeedSequence's hashmix with its running constant (the same for every id)."""

    def __init__(self) -> None:
        self.constant = _INIT_A

    def __call__(self, value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(self.constant)
        self.constant = (self.constant * _MULT_A) & _MASK32
        value = value * np.uint32(self.constant)
        return value ^ (value >> np.uint32(16))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return result ^ (result >> np.uint32(16))


def _mix_entropy(entropy: list[np.ndarray], count: int) -> list[np.ndarray]:
    hashmix = _HashMix()
    zero = np.zeros(count, dtype=np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
    for source in range(_POOL_SIZE):
        for target in range(_POOL_SIZE):
            if source != target:
                pool[target] = _mix(pool[target], hashmix(pool[source]))
    for source in range(_POOL_SIZE, len(entropy)):
        for target in range(_POOL_SIZE):
            pool[target] = _mix(pool[target], hashmix(entropy[source]))
    return pool


def _generate_state(pool: list[np.ndarray], num_words: int) -> list[np.ndarray]:
    constant = _INIT_B
    words = []
    for i in range(num_words):
        value = pool[i % _POOL_SIZE] ^ np.uint32(constant)
        constant = (constant * _MULT_B) & _MASK32
        value = value * np.uint32(constant)
        words.append(value ^ (value >> np.uint32(16)))
    return words
