"""Router benchmark: KV event ingestion and routing decision latency, in process, on a CPU.

  python benchmarks/router_bench.py [--workers 32] [--blocks-per-worker 100000] [--queries 1000]

The workload is a pool of workers whose caches hold many conversations with chained block hashes:

- 8 system prompts (16 to 96 blocks) that most conversations start with;
- 64 documents (a system prompt, then 128 to 1024 blocks), each cached on about a quarter of the
  workers, as popular prompts are;
- per worker, private conversations (a system prompt or a document, then 32 to 1536 blocks of
  their own) until the worker holds exactly `--blocks-per-worker` blocks.

Hashes are random 64-bit integers chained by construction (a prefix shared means the same hashes):
the index only compares them, so this is what xxh3 would give at a fraction of the set-up time.

1. Ingestion: every worker's blocks arrive as BlockStored events of 16 to 64 hashes (a block
   already cached on that worker is not stored again), interleaved across workers, through
   KVIndex.apply. Then 10% of each worker's blocks leave as BlockRemoved events, conversation tails
   first as LRU eviction does.
2. Query + decision: KVIndex.overlaps(prompt) + KVRouterPolicy.choose(...) per prompt of 128 and
   1024 blocks, by kind: cold (nothing cached), system (a system prompt, then new blocks), document,
   conversation (a random prefix of a cached conversation, then new blocks), cached (the first
   blocks of a cached chain, all of them held by some worker: the longest walk). The tracker keeps
   256 requests in flight so loads vary. The garbage collector stays on, as in a server; the time of
   one full collection is reported beside.
3. Baseline, same prompts, same run: one flat dict hash -> worker bitmask, walked block by block
   (what KVIndex's runs replace), to show where the time goes.
4. Restart: a second index rebuilt from one snapshot per worker (its hashes in the order it cached
   them, with their parents, as BlockManager.cached_hashes lists them), its load rate, and the
   1024-block queries again.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import time
from collections import deque

from tandem.contracts.kv_events import BlockRemoved, BlockStored
from tandem.router.kv_index import KVIndex
from tandem.router.kv_policy import ActiveLoadTracker, KVPolicyConfig, KVRouterPolicy

KINDS = ("cold", "system", "document", "conversation", "cached")


def build_caches(rng: random.Random, num_workers: int, blocks_per_worker: int):
    """Per worker, the chains it caches (each a list of hashes, shared prefixes included)."""
    fresh = lambda n: [rng.getrandbits(64) for _ in range(n)]  # noqa: E731
    systems = [fresh(rng.randint(16, 96)) for _ in range(8)]
    documents = [rng.choice(systems) + fresh(rng.randint(128, 1024)) for _ in range(64)]
    chains: list[list[list[int]]] = [[] for _ in range(num_workers)]
    for document in documents:
        for worker in rng.sample(range(num_workers), max(1, num_workers // 4)):
            chains[worker].append(document)
    for worker_chains in chains:
        held = {h for chain in worker_chains for h in chain}
        while len(held) < blocks_per_worker:
            base = rng.choice(systems) if rng.random() < 0.5 else rng.choice(documents)
            new_positions = [i for i, h in enumerate(base) if h not in held]
            room = blocks_per_worker - len(held)
            if len(new_positions) > room:  # the last chain: cut it to fit exactly
                base = base[:new_positions[room]]
            tail = fresh(min(rng.randint(32, 1536), room - min(room, len(new_positions))))
            worker_chains.append(base + tail)
            held.update(base + tail)
    return systems, documents, chains


def stored_events(rng: random.Random, chains: list[list[int]]) -> list[BlockStored]:
    """One worker's BlockStored events of 16-64 hashes, skipping blocks it already cached."""
    events: list[BlockStored] = []
    held: set[int] = set()
    for chain in chains:
        start = 0
        while start < len(chain) and chain[start] in held:
            start += 1
        while start < len(chain):
            stop = min(start + rng.randint(16, 64), len(chain))
            parent = chain[start - 1] if start else None
            events.append(BlockStored(len(events), parent, tuple(chain[start:stop])))
            held.update(chain[start:stop])
            start = stop
    return events


def interleave(per_worker: list[list]) -> list[tuple[int, object]]:
    longest = max(len(events) for events in per_worker)
    return [(w, events[i]) for i in range(longest) for w, events in enumerate(per_worker)
            if i < len(events)]


def eviction_events(rng: random.Random, index: KVIndex, worker_id: str, chains: list[list[int]],
                    first_event_id: int, fraction: float) -> list[BlockRemoved]:
    """Remove `fraction` of the worker's blocks, conversation tails first, 16-64 per event."""
    budget = int(index.num_blocks(worker_id) * fraction)
    events: list[BlockRemoved] = []
    removed: set[int] = set()
    for chain in rng.sample(chains, len(chains)):
        end = len(chain)
        while budget > 0 and end > 0:
            batch = [h for h in reversed(chain[max(0, end - rng.randint(16, 64)):end])
                     if h not in removed][:budget]
            end -= 64
            if batch:
                events.append(BlockRemoved(first_event_id + len(events), tuple(batch)))
                removed.update(batch)
                budget -= len(batch)
        if budget <= 0:
            break
    return events


def make_prompts(rng: random.Random, kind: str, num_blocks: int, count: int, systems, documents,
                 chains) -> list[list[int]]:
    prompts = []
    long_chains = [c for worker in chains for c in worker if len(c) >= num_blocks]
    for _ in range(count):
        if kind == "cold":
            prefix = []
        elif kind == "system":
            prefix = rng.choice(systems)
        elif kind == "document":
            prefix = rng.choice(documents)[:num_blocks]
        elif kind == "conversation":
            chain = rng.choice(rng.choice(chains))
            prefix = chain[:rng.randint(1, min(len(chain), num_blocks))]
        else:
            prefix = rng.choice(long_chains)[:num_blocks]
        prompt = prefix + [rng.getrandbits(64) for _ in range(num_blocks - len(prefix))]
        # New int objects, as a frontend's hashing makes: comparing them with the index's hashes
        # reads both, where the same objects would pass on identity alone.
        prompts.append([int.from_bytes(h.to_bytes(8, "little"), "little") for h in prompt])
    return prompts


def flat_masks(chains: list[list[list[int]]]) -> dict[int, int]:
    masks: dict[int, int] = {}
    for position, worker_chains in enumerate(chains):
        bit = 1 << position
        for chain in worker_chains:
            for h in chain:
                masks[h] = masks.get(h, 0) | bit
    return masks


def flat_overlaps(masks: dict[int, int], workers: list[str], prompt: list[int]) -> dict[str, int]:
    alive, depths = (1 << len(workers)) - 1, {}
    for depth, h in enumerate(prompt):
        narrowed = alive & masks.get(h, 0)
        if narrowed != alive:
            for position in range(len(workers)):
                if (alive ^ narrowed) >> position & 1 and depth:
                    depths[workers[position]] = depth
            alive = narrowed
            if not alive:
                break
    else:
        for position in range(len(workers)):
            if alive >> position & 1:
                depths[workers[position]] = len(prompt)
    return depths


def time_decisions(prompts, overlaps_of, workers, policy, tracker) -> list[float]:
    latencies_us, in_flight = [], deque()
    loads = tracker.loads()
    for prompt in prompts:
        start = time.perf_counter()
        overlaps = overlaps_of(prompt)
        choice = policy.choose(workers, len(prompt), overlaps, loads)
        latencies_us.append((time.perf_counter() - start) * 1e6)
        request_id = f"r{len(latencies_us)}-{id(prompt)}"
        tracker.on_routed(request_id, choice.worker_id, len(prompt),
                          len(prompt) - choice.overlap_blocks)
        in_flight.append(request_id)
        if len(in_flight) > 256:
            tracker.on_finished(in_flight.popleft())
        if len(in_flight) > 32:
            tracker.on_first_token(in_flight[-32])
    for request_id in in_flight:
        tracker.on_finished(request_id)
    return latencies_us


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--blocks-per-worker", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000, help="prompts per kind and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    systems, documents, chains = build_caches(rng, args.workers, args.blocks_per_worker)
    workers = [f"w{i:02d}" for i in range(args.workers)]
    per_worker = [stored_events(rng, worker_chains) for worker_chains in chains]
    arrivals = interleave(per_worker)
    num_stored = sum(len(e.block_hashes) for _, e in arrivals)

    index = KVIndex()
    for worker_id in workers:
        index.add_worker(worker_id)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for position, event in arrivals:
        assert index.apply(workers[position], event)
    stored_s = time.perf_counter() - start
    index_rss_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    flat = flat_masks(chains)
    print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs; {args.workers} workers x "
          f"{args.blocks_per_worker} blocks: {sum(index.num_blocks(w) for w in workers)} held, "
          f"{len(flat)} distinct; the index grew the peak RSS by {index_rss_mib:.0f} MiB")

    start = time.perf_counter()
    gc.collect()
    print(f"one full garbage collection: {(time.perf_counter() - start) * 1e3:.0f} ms")

    policy = KVRouterPolicy(KVPolicyConfig(seed=args.seed))
    tracker = ActiveLoadTracker()
    baseline = None if args.no_baseline else flat
    rows = []
    for num_blocks in (128, 1024):
        for kind in KINDS:
            prompts = make_prompts(rng, kind, num_blocks, args.queries, systems, documents, chains)
            runs = time_decisions(prompts, index.overlaps, workers, policy, tracker)
            flat_runs = (time_decisions(prompts, lambda p: flat_overlaps(baseline, workers, p),
                                        workers, policy, tracker) if baseline else [])
            if baseline:
                assert all(index.overlaps(p) == flat_overlaps(baseline, workers, p)
                           for p in prompts), "the index and the flat baseline disagree"
            matched = sum(max(index.overlaps(p).values(), default=0) for p in prompts)
            rows.append((num_blocks, kind, matched / len(prompts), runs, flat_runs))

    restored = KVIndex()
    start = time.perf_counter()
    for position, worker_id in enumerate(workers):
        restored.add_worker(worker_id)
        order = [h for e in per_worker[position] for h in e.block_hashes]
        parents = [p for e in per_worker[position]
                   for p in (e.parent_hash, *e.block_hashes[:-1])]
        restored.load_snapshot(worker_id, index.last_event_id(worker_id), order, parents)
    snapshot_s = time.perf_counter() - start
    restored_rows = []
    for kind in KINDS[2:]:
        prompts = make_prompts(rng, kind, 1024, args.queries, systems, documents, chains)
        restored_rows.append((kind, time_decisions(prompts, restored.overlaps, workers, policy,
                                                   tracker)))
    del restored

    removals = [eviction_events(rng, index, w, chains[i], index.last_event_id(w) + 1, 0.10)
                for i, w in enumerate(workers)]
    departures = interleave(removals)
    num_removed = sum(len(e.block_hashes) for _, e in departures)
    start = time.perf_counter()
    for position, event in departures:
        assert index.apply(workers[position], event)
    removed_s = time.perf_counter() - start

    print("\ningestion | events | blocks | s | blocks/s")
    print(f"BlockStored | {len(arrivals)} | {num_stored} | {stored_s:.2f} | "
          f"{num_stored / stored_s:,.0f}")
    print(f"BlockRemoved | {len(departures)} | {num_removed} | {removed_s:.2f} | "
          f"{num_removed / removed_s:,.0f}")
    print(f"load_snapshot | {len(workers)} | {num_stored} | {snapshot_s:.2f} | "
          f"{num_stored / snapshot_s:,.0f}")
    print("\nprompt blocks | kind | mean best overlap | overlaps+choose p50 us | p99 us | "
          "flat-dict baseline p50 us | p99 us")
    for num_blocks, kind, mean_overlap, runs, flat_runs in rows:
        baseline_cells = (f"{percentile(flat_runs, 0.5):.0f} | "
                          f"{percentile(flat_runs, 0.99):.0f}" if flat_runs else "- | -")
        print(f"{num_blocks} | {kind} | {mean_overlap:.0f} | {percentile(runs, 0.5):.0f} | "
              f"{percentile(runs, 0.99):.0f} | {baseline_cells}")
    for num_blocks in (128, 1024):
        pooled = [v for n, _, _, runs, _ in rows if n == num_blocks for v in runs]
        print(f"{num_blocks} | all kinds | | {percentile(pooled, 0.5):.0f} | "
              f"{percentile(pooled, 0.99):.0f} |")
    for kind, latencies in restored_rows:
        print(f"1024 | {kind}, index from snapshots | | {percentile(latencies, 0.5):.0f} | "
              f"{percentile(latencies, 0.99):.0f} |")


if __name__ == "__main__":
    main()
