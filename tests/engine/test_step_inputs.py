"""A step's host inputs as device tensors (engine/step_inputs.py, ModelRunner.to_device)."""

from __future__ import annotations

import torch

from tandem.engine.step_inputs import block_table_array


def test_block_tables_are_padded_with_block_zero_to_the_longest():
    tables = [[7, 3, 9], [], [5], [1, 2, 4, 8, 6]]
    array = block_table_array(tables)
    assert array.dtype.name == "int32" and array.shape == (4, 5)
    assert array.tolist() == [[7, 3, 9, 0, 0], [0] * 5, [5, 0, 0, 0, 0], [1, 2, 4, 8, 6]]
    # The same tensor the nested lists gave before.
    padded = [t + [0] * (5 - len(t)) for t in tables]
    assert torch.equal(torch.from_numpy(array), torch.tensor(padded, dtype=torch.int32))
