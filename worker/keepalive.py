"""HTTP/2 keepalive on the internal channels (frontend <-> workers, decode -> prefill workers), so
that the transport itself finds a peer that is gone.

A worker killed on its host closes its sockets and its callers learn at once (UNAVAILABLE). A host
that loses power or drops off the network closes nothing: without keepalive a Generate stream to it
would wait for its idle deadline (60 s) and a KV event stream, which has none, forever. With it,
each side pings a connection that has been quiet for `KEEPALIVE_TIME_MS` and closes it when the
ack does not come within `KEEPALIVE_TIMEOUT_MS`; its calls then fail as UNAVAILABLE, which the
frontend takes as proof that the worker is gone (router/migration.py) and migrates its requests.

Why these values. The ack is sent by gRPC's own transport threads, not by the Python code, so a
process that is merely starved of CPU still answers within a second or two; only a stopped process
(SIGSTOP), a dead host or a broken network misses 20 s of it. 10 + 20 s matches the registry's
default `dead_after_s` (30 s, frontend/server.py): the transport and the heartbeats give up on a
silent peer at about the same time, and never as early as a late heartbeat makes a worker suspect.

The server side must accept pings this frequent: gRPC servers by default allow one ping per 5
minutes on a connection that carries no data and answer more with GOAWAY ("too_many_pings"),
which would break the very streams keepalive is meant to protect (the KV event stream is quiet
whenever the cache does not change).
"""

from __future__ import annotations

KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 20_000

CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC 1.85 waits for any ping's ack this long (default 60 s), keepalive's included: measured
    # against a SIGSTOPped peer, keepalive_timeout_ms alone closed the connection after 60 s.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),   # an idle channel's peer is checked too
    ("grpc.http2.max_pings_without_data", 0),     # a quiet stream (KV events) keeps pinging
)

SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    # Half the clients' interval: pings that a slow scheduler bunches up are no strike.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),           # 0: never GOAWAY a peer for pinging
)
