"""Synthetic datasets: lengths, token ranges, shared prefixes, growing multi-turn prompts."""

from __future__ import annotations

import pytest

from tandem.bench.datasets import (FIRST_ORDINARY_TOKEN_ID, MultiTurnConfig, RandomDatasetConfig,
                                   SharedPrefixConfig, multi_turn_dataset, random_dataset,
                                   shared_prefix_dataset)


def test_random_lengths_stay_in_range_and_ids_avoid_special_tokens():
    config = RandomDatasetConfig(num_requests=200, input_len=100, output_len=20,
                                 range_ratio=0.5, vocab_size=300)
    requests = random_dataset(config, seed=3)
    assert len(requests) == 200
    input_lens = [r.prompt_len for r in requests]
    output_lens = [r.output_len for r in requests]
    assert min(input_lens) >= 50 and max(input_lens) <= 150
    assert min(output_lens) >= 10 and max(output_lens) <= 30
    assert len(set(input_lens)) > 20  # actually spread, not constant
    all_ids = [t for r in requests for t in r.prompt_token_ids]
    assert min(all_ids) >= FIRST_ORDINARY_TOKEN_ID and max(all_ids) < 300


def test_random_zero_range_ratio_gives_exact_lengths_and_seed_reproduces():
    config = RandomDatasetConfig(num_requests=5, input_len=33, output_len=7)
    first = random_dataset(config, seed=1)
    assert [r.prompt_len for r in first] == [33] * 5
    assert [r.output_len for r in first] == [7] * 5
    assert first == random_dataset(config, seed=1)
    assert first != random_dataset(config, seed=2)


def test_shared_prefix_groups_share_exactly_the_system_prompt():
    config = SharedPrefixConfig(num_groups=3, prompts_per_group=4, system_prompt_len=20,
                                question_len=6, output_len=9)
    requests = shared_prefix_dataset(config, seed=0)
    assert len(requests) == 12
    assert all(r.prompt_len == 26 and r.output_len == 9 for r in requests)
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for request in requests:
        groups.setdefault(request.prompt_token_ids[:20], []).append(request.prompt_token_ids)
    assert len(groups) == 3 and all(len(members) == 4 for members in groups.values())
    systems = list(groups)
    for i, a in enumerate(systems):  # different groups differ from the first token on
        for b in systems[i + 1:]:
            assert a[0] != b[0] or a != b
    # Shuffled: the first four requests are not all one group.
    assert len({r.prompt_token_ids[:20] for r in requests[:4]}) > 1


def test_multi_turn_prompts_grow_by_reply_and_user_message():
    config = MultiTurnConfig(num_conversations=3, turns=4, user_len=5, output_len=7)
    requests = multi_turn_dataset(config, seed=0)
    assert len(requests) == 12
    # Round-robin by turn: all first turns, then all second turns, ...
    assert [r.turn_index for r in requests] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for conversation in range(3):
        turns = sorted((r for r in requests if r.session_id == conversation),
                       key=lambda r: r.turn_index)
        assert [r.prompt_len for r in turns] == [5, 17, 29, 41]
        for earlier, later in zip(turns, turns[1:]):
            assert later.prompt_token_ids[:earlier.prompt_len] == earlier.prompt_token_ids
    first_turns = [r.prompt_token_ids for r in requests[:3]]
    assert len(set(first_turns)) == 3


@pytest.mark.parametrize("bad", [
    lambda: RandomDatasetConfig(range_ratio=1.0),
    lambda: RandomDatasetConfig(vocab_size=16),
    lambda: SharedPrefixConfig(num_groups=0),
    lambda: MultiTurnConfig(turns=0),
])
def test_invalid_configs_raise_value_error(bad):
    with pytest.raises(ValueError):
        bad()
