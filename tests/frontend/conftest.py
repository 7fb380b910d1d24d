"""One real `tandem serve` (1 prefill + 1 decode worker on a tiny llama checkpoint) shared by the
drop-in client tests (test_kserve.py, test_observability.py): starting one takes most of their time.
It logs at INFO with a stats line every 0.5 s, so tests can read the access and stats lines.
"""

from __future__ import annotations

import pytest

from tests.checkpoints import make_checkpoint
from tests.serving_harness import start_server


@pytest.fixture(scope="session")
def dropin_server(tmp_path_factory):
    pytest.importorskip("nixl")
    model_dir = str(make_checkpoint("llama", tmp_path_factory.mktemp("dropin-llama")))
    server = start_server("--model", model_dir, "--num-prefill", "1", "--num-decode", "1",
                          "--device", "cpu", "--num-kv-blocks", "128",
                          "--remote-prefill-min-tokens", "16", "--drain-timeout-s", "5",
                          env={"TANDEM_LOG_STATS_INTERVAL_S": "0.5"}, log_level="INFO")
    server.model = model_dir
    yield server
    assert server.stop() == 0
