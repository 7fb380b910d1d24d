"""tandem.worker: what both worker roles share: the engine behind an asyncio loop, registration and
heartbeats, KV event streaming, and clients for calling other workers."""
