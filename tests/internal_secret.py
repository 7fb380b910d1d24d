"""The internal secret for tests that call a worker's or the frontend's internal API themselves.

conftest.py puts a secret in this test process's TANDEM_INTERNAL_SECRET before any server starts;
`tandem serve` adopts an operator's secret (worker/auth.py), and so do Ray clusters started from
here, whose processes inherit the environment. A test then authenticates with `internal_metadata()`:

    stub.GetStats(wpb.StatsRequest(), metadata=internal_metadata(), timeout=5)
"""

from __future__ import annotations

import os

from tandem.worker.auth import METADATA_KEY, SECRET_ENV


def internal_metadata() -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, os.environ[SECRET_ENV]),)
