"""tandem's load generator (`tandem bench`): synthetic and replayed workloads against a server.

The pure parts build the workload and read the results: `datasets` and `trace` make the list of
requests, `arrivals` says when each is sent, `metrics` aggregates what was measured and `report`
formats it. The I/O parts send and time requests (`openai_client`, `grpc_client`, `runner`) and
write files (`plot`, `cli`).
"""

from tandem.bench.cli import add_bench_parser, bench_main, build_requests
from tandem.bench.metrics import Summary, ideal_prefix_hit_rate, summarize
from tandem.bench.records import BenchRequest, RequestRecord

__all__ = [
    "BenchRequest", "RequestRecord", "Summary", "add_bench_parser", "bench_main",
    "build_requests", "ideal_prefix_hit_rate", "summarize",
]
