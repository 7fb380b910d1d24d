"""Discrete-event simulation of a whole tandem deployment, driving tandem's real pure cores.

What is real: each worker's scheduler, block manager and prefix cache (planner/sim_worker.py), the
router with its KV indexes fed by the block managers' own KV events, its routing policy, load books
and conditional disaggregation (tandem.router.routing), the worker registry's pool order, the stop
rule. What is modelled: time. Step durations come from the performance model fitted from a
profile, KV pulls from its transfer curve, and the frontend's own work from constant latencies.

Event model. One heap of (time, sequence number, kind, payload); the sequence number keeps ties in
the order they were made. Kinds, mirroring what the real processes do:

- SEND: the client sends a request (arrival offset, after its session's previous turn finished and
  a concurrency slot is free, as tandem.bench.runner does); routing follows after the frontend's
  overhead (a CALL event): the router picks a decode worker and maybe a prefill worker (frontend/pipeline.py).
- DELIVER: an operation reaches a worker one RPC hop later and is queued; the worker applies queued
  operations between steps (engine/async_engine.py) or at once when idle, then starts a step.
- STEP_END: the worker postprocesses its batch. A decode (or aggregated) worker streams each new
  token to the client one hop later; a prefill worker's finished sequences (first token, blocks
  pinned) go back to the frontend, which streams the first token and hands the request to its
  decode worker: `add_remote` there, then after `transfer_s(missing blocks' bytes)` PULLED:
  `complete_remote` on the decode worker and `release_pinned` on the prefill worker (the pull's
  notification, decode_workers/service.py and prefill_workers/service.py).
- KV_EVENT: with `kv_event_delay_s` > 0 a block manager's event reaches the router's index later;
  otherwise it is applied as it happens. HEARTBEAT: every interval each worker's block count
  corrects the router's load books (`on_worker_stats`), as frontend heartbeats do.

Every step is run through the scheduler: a stretch of identical decode steps is planned as one
event (planner/sim_worker.py) but executed step by step when it ends, so the schedule is exactly
what the engine would run for the same arrivals (tests/planner/test_simulator.py checks it step by
step); only the router hears of a stretch's output blocks when it ends.

The frontend's token ceiling. With `frontend_s_per_token` > 0 every streamed token reaches its
client through one shared server that takes the streams in turn (planner/sim_frontend.py): a
decode step's tokens are queued there as it ends, a stretch's as it is planned, a prefill answer's
first token as the frontend gets it. A request's recorded token times are then delivery times, and
it finishes (freeing its client's concurrency slot, ending its load in the router's books) when its
last token is delivered: a check at its last token's arrival, run after every other event of that
instant, serves the frontend that far; if the token still waits, the check runs again when its
turn can first start (the frontend's lower bound), until it is served, and schedules the finish.
The router still hears of a first token on its arrival. With 0 none of this runs and tokens reach
the client as they reach the frontend.
"""

from __future__ import annotations

import gc
import heapq
import logging
import time
from collections.abc import Callable, Sequence as Seq
from contextlib import contextmanager
from functools import partial

from tandem.bench.records import BenchRequest
from tandem.contracts.sampling_params import SamplingParams
from tandem.contracts.worker_stats import Registration
from tandem.engine.sequence import Sequence
from tandem.planner.sim_clients import ClientBook
from tandem.planner.sim_config import SimConfig
from tandem.planner.sim_frontend import SharedFrontend
from tandem.planner.sim_index_process import IndexProcess
from tandem.planner.sim_prompt_hashes import PromptHasher
from tandem.planner.sim_records import SimRequest, SimResult
from tandem.planner.sim_worker import SimWorker
from tandem.router.routing import Router
from tandem.router.worker_registry import WorkerRegistry

logger = logging.getLogger(__name__)

SEND, DELIVER, STEP_END, PULLED, KV_EVENT, HEARTBEAT, CALL = range(7)
MODEL_NAME = "simulated"
# Added to the sequence number of an event that must run after every other event at its instant.
AFTER_TIES = 1 << 62


@contextmanager
def _collector_paused():
    """No garbage collection during the run, one after it. The run makes no reference cycles
    that outlive an event (a lambda on the heap refers to the simulator until it is popped), and
    collecting while it runs only walked its live sequences' token lists again and again (the
    whole conversation trace: 290M ids, 3 s of collections)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Simulator:
    def __init__(self, config: SimConfig, model,
                 on_step: Callable[[SimWorker, object], None] | None = None):
        self.config = config
        self.model = model
        self.on_step = on_step  # test hook: sees every scheduled batch
        self.index_process = IndexProcess() if config.kv_index_process else None
        self.router = Router(config.routing, config.block_size,
                             self.index_process.indexes if self.index_process else None)
        self.prompt_hasher = PromptHasher(config.block_size)
        self.registry = WorkerRegistry(MODEL_NAME, config.block_size)
        self.workers: dict[str, SimWorker] = {}
        roles = ["prefill"] * config.num_prefill + ["decode"] * config.num_decode
        counters = {"prefill": 0, "decode": 0}
        for role in roles:
            worker_id = f"{role}-{counters[role]}"
            counters[role] += 1
            state = self.registry.register(Registration(
                worker_id, role, f"sim:{worker_id}", config.block_size, MODEL_NAME,
                config.num_kv_blocks), 0.0)
            worker = SimWorker(worker_id, role, config, model, state)
            self.workers[worker_id] = worker
            self.router.indexes[role].add_worker(worker_id)
            worker.block_manager.subscribe(self._kv_listener(worker))
        self.pools = {role: self.registry.pool(role) for role in ("decode", "prefill")}
        self.frontend = (SharedFrontend(config.frontend_s_per_token)
                         if config.frontend_s_per_token > 0 else None)
        self._ranks = {worker: rank for rank, worker in enumerate(self.workers.values())}
        self._heap: list = []
        self._waking: set[SimWorker] = set()
        self._counter = 0
        self.now_s = 0.0
        self.num_remote_prefills = 0

    # ---- public API ----------------------------------------------------------------------------

    def run(self, requests: Seq[BenchRequest], offsets_s: Seq[float],
            max_concurrency: int | None = None) -> SimResult:
        started = time.perf_counter()
        self.requests = [SimRequest(i, r, offsets_s[i]) for i, r in enumerate(requests)]
        self.clients = ClientBook(requests, offsets_s, max_concurrency)
        for send_s, index in self.clients.first_sends:
            self._push(send_s, SEND, index)
        if requests:
            self._push(self.config.heartbeat_interval_s, HEARTBEAT, None)
        with _collector_paused():
            self._loop()
            if self.frontend is not None:
                self.frontend.serve_all()
        return SimResult(self.requests, self, time.perf_counter() - started)

    def close(self) -> None:
        """Stop the KV index process, if the router's indexes run in one; they are gone after."""
        if self.index_process is not None:
            self.index_process.close()
            self.index_process = None

    # ---- the event loop --------------------------------------------------------------------------

    def _push(self, time_s: float, kind: int, payload) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (time_s, self._counter, kind, payload))

    def _push_after_ties(self, time_s: float, kind: int, payload) -> None:
        self._counter += 1
        heapq.heappush(self._heap, (time_s, self._counter + AFTER_TIES, kind, payload))

    def _loop(self) -> None:
        heap = self._heap
        pop = heapq.heappop
        while heap:
            now_s, _, kind, payload = pop(heap)
            self.now_s = now_s
            if kind == STEP_END:
                self._on_step_end(payload)
            elif kind == DELIVER:
                self._deliver(*payload)
            elif kind == CALL:
                payload()
            elif kind == SEND:
                self._on_send(payload)
            elif kind == PULLED:
                self._on_pulled(*payload)
            elif kind == KV_EVENT:
                worker, event = payload
                self.router.indexes[worker.role].apply(worker.worker_id, event)
            elif kind == HEARTBEAT:
                self._on_heartbeat()

    def _later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run fn at now + delay (at once when there is no delay)."""
        if delay_s > 0:
            self._push(self.now_s + delay_s, CALL, fn)
        else:
            fn()

    def _send_op(self, worker: SimWorker, op: Callable[[], None], joins: bool = True) -> None:
        """An operation that reaches `worker` one RPC hop from now."""
        if self.config.rpc_s > 0:
            self._push(self.now_s + self.config.rpc_s, DELIVER, (worker, op, joins))
        else:
            self._deliver(worker, op, joins)

    def _deliver(self, worker: SimWorker, op: Callable[[], None], joins: bool = True) -> None:
        """`joins`: the operation brings a sequence into the batch, so a step queued ahead runs
        without it (SimWorker.start_step); one that does not (starting a pull) takes effect at the
        step boundary whatever runs next."""
        (worker.ops if joins else worker.ops_now).append(op)
        if worker.is_idle:
            # Like the engine loop's wake-up: everything delivered at this instant is applied
            # before the first step, not just the first operation.
            if worker not in self._waking:
                self._waking.add(worker)
                self._push(self.now_s, CALL, lambda: self._wake(worker))
        elif worker.stretch_ends_s is not None:
            end_s = worker.cut_stretch(self.now_s)
            if end_s is not None:  # the queued end event is now stale (its generation)
                self._push(end_s, STEP_END, (worker, worker.generation))

    def _wake(self, worker: SimWorker) -> None:
        self._waking.discard(worker)
        if worker.is_idle:
            self._start_step(worker)

    def _start_step(self, worker: SimWorker) -> None:
        end_s = worker.start_step(self.now_s)
        if end_s is not None:
            if worker.stretch_ends_s is None:
                if self.on_step is not None:
                    self.on_step(worker, worker.batch)  # a stretch shows its batches as it runs
            elif self.frontend is not None:
                # The frontend sees a stretch's steps as they are planned, so that it serves them
                # in time order with the other workers' (its end times are shared: a cut shows).
                lists = [self.requests[int(seq.request_id)].token_times_s
                         for seq in worker.batch.seqs]
                self.frontend.add(worker.stretch_ends_s, self.config.rpc_s, self._ranks[worker],
                                  lists)
            self._push(end_s, STEP_END, (worker, worker.generation))

    # ---- requests ------------------------------------------------------------------------------

    def _on_send(self, index: int) -> None:
        if not self.clients.try_send(index):
            return
        request = self.requests[index]
        request.send_s = self.now_s
        self._later(self.config.frontend_overhead_s, lambda: self._on_route(index))

    def _on_route(self, index: int) -> None:
        request = self.requests[index]
        prompt = request.bench.prompt_token_ids
        if len(prompt) >= self.config.max_model_len or not prompt:
            self._fail(request, f"the prompt has {len(prompt)} tokens; the context is "
                                f"{self.config.max_model_len}")
            return
        request.block_hashes = self.prompt_hasher.hashes(prompt)
        decision = self.router.route(request.request_id, len(prompt), request.block_hashes,
                                     self.pools["decode"], self.pools["prefill"])
        request.decode_worker = self.workers[decision.decode_worker]
        if decision.prefill_worker is None:
            worker = request.decode_worker
        else:
            self.num_remote_prefills += 1
            worker = request.prefill_worker = self.workers[decision.prefill_worker]
        self._send_op(worker, lambda: self._add_local(worker, request))

    def _new_sequence(self, request: SimRequest) -> Sequence:
        bench = request.bench
        # The bench prompt (a tuple) is shared, not copied: Sequence copies it into token_ids.
        return Sequence(request.request_id, bench.prompt_token_ids,
                        SamplingParams(max_tokens=bench.output_len, temperature=0.0,
                                       ignore_eos=True),
                        self.config.block_size, arrival_time=request.send_s,
                        block_hashes=list(request.block_hashes))

    def _add_local(self, worker: SimWorker, request: SimRequest) -> None:
        seq = self._new_sequence(request)
        try:
            worker.scheduler.add(seq)
        except ValueError as err:
            self._fail(request, str(err))
            return
        request.seq = seq

    def _on_step_end(self, payload: tuple[SimWorker, int]) -> None:
        worker, generation = payload
        if generation != worker.generation:
            return  # a stretch that was cut short ends at another event
        if worker.stretch_ends_s is not None:
            self._end_stretch(worker)
            return
        advanced = worker.finish_step()
        requests = self.requests
        # The next step starts first: after a step that decoded, one carrying prompt tokens is
        # queued before this step's tokens are handed back (SimWorker.handoff_s).
        self._start_step(worker)
        if worker.role == "prefill":   # its answers leave at the boundary this step reaches
            delay_s = worker.answer_delay_s(self.now_s) + self.config.rpc_s
            for seq in advanced:
                self._later(delay_s, lambda r=requests[int(seq.request_id)], s=seq:
                            self._on_prefilled(r, s))
            return
        sent_s = self.now_s + worker.handoff_s()
        token_s = sent_s + self.config.rpc_s
        frontend = self.frontend
        for seq in advanced:
            request = requests[int(seq.request_id)]
            if request.first_token_s is None:
                request.first_token_s = token_s
                request.cached_tokens = seq.num_cached_prompt_tokens
                self._later(self.config.rpc_s,
                            lambda rid=request.request_id: self.router.on_first_token(rid))
            if frontend is None:
                request.token_times_s.append(token_s)
                if seq.is_finished:
                    self._later(self.config.rpc_s, lambda r=request: self._on_finished(r))
        if frontend is not None and advanced:
            streamed = [requests[int(seq.request_id)] for seq in advanced]
            frontend.add([sent_s], self.config.rpc_s, self._ranks[worker],
                         [request.token_times_s for request in streamed])
            self._finish_when_delivered(token_s, [
                request for request, seq in zip(streamed, advanced) if seq.is_finished])

    def _end_stretch(self, worker: SimWorker) -> None:
        """Run a stretch of identical decode steps: every sequence gets a token each step."""
        rpc_s = self.config.rpc_s
        on_step = self.on_step
        requests = [self.requests[int(seq.request_id)] for seq in worker.batch.seqs]
        if self.frontend is not None:
            self._end_stretch_through_frontend(worker, requests)
            return
        if on_step is None:
            token_times_s = [end_s + rpc_s for end_s in worker.stretch_ends_s]
            worker.run_stretch(None)
            for request in requests:
                request.token_times_s.extend(token_times_s)
        else:
            times = [request.token_times_s for request in requests]

            def on_batch(batch, end_s: float) -> None:
                on_step(worker, batch)
                token_s = end_s + rpc_s
                for request_times_s in times:
                    request_times_s.append(token_s)

            worker.run_stretch(on_batch)
        for request in requests:
            if request.seq.is_finished:
                self._later(rpc_s, lambda r=request: self._on_finished(r))
        self._start_step(worker)

    def _end_stretch_through_frontend(self, worker: SimWorker, requests: list[SimRequest]
                                      ) -> None:
        """A stretch whose tokens the frontend queued when it was planned (_start_step)."""
        on_step = self.on_step
        worker.run_stretch(None if on_step is None
                           else lambda batch, end_s: on_step(worker, batch))
        self._finish_when_delivered(self.now_s + self.config.rpc_s, [
            request for request in requests if request.seq.is_finished])
        self._start_step(worker)

    def _finish_when_delivered(self, arrival_s: float, finished: list[SimRequest]) -> None:
        """Finish requests once the frontend has delivered their last token (which reaches it at
        `arrival_s`). That is worked out at `arrival_s`, after every other event of that instant:
        by then every token that reaches the frontend no later has been queued."""
        if finished:
            self._push_after_ties(arrival_s, CALL, lambda: self._on_delivered(finished))

    def _on_delivered(self, finished: list[SimRequest]) -> None:
        frontend = self.frontend
        frontend.serve_through(self.now_s)
        waiting = []
        for request in finished:
            if frontend.is_delivered(request.token_times_s):  # its client has its last token
                self._push(request.token_times_s[-1], CALL, lambda r=request: self._on_finished(r))
            else:
                waiting.append(request)
        if waiting:  # streams ahead of them take turns first: look again when theirs can come
            check_s = min(frontend.earliest_last_turn_s(r.token_times_s) for r in waiting)
            self._push_after_ties(check_s, CALL, lambda: self._on_delivered(waiting))

    def _on_prefilled(self, request: SimRequest, prefill_seq: Sequence) -> None:
        """The frontend has the prefill worker's answer: stream the first token, hand over."""
        request.first_token_s = self.now_s
        if self.frontend is None:
            request.token_times_s.append(self.now_s)
        else:
            self.frontend.add([self.now_s], 0.0, self._ranks[request.prefill_worker],
                              [request.token_times_s])
        request.cached_tokens = prefill_seq.num_cached_prompt_tokens
        self.router.on_first_token(request.request_id)
        prefill = request.prefill_worker
        if request.bench.output_len <= 1:  # the first token ended it: free the pinned copy
            self._send_op(prefill, lambda: prefill.scheduler.release_pinned(request.request_id))
            if self.frontend is None:
                self._on_finished(request)
            else:
                self._finish_when_delivered(self.now_s, [request])
            return
        first_token_id = prefill_seq.token_ids[-1]
        decode = request.decode_worker
        # Parking it and starting its pull does not wait for the step queued ahead; its joining
        # the batch when the pull completes does.
        self._send_op(decode, lambda: self._add_remote(decode, prefill, request, first_token_id),
                      joins=False)

    def _add_remote(self, decode: SimWorker, prefill: SimWorker, request: SimRequest,
                    first_token_id: int) -> None:
        seq = self._new_sequence(request)
        try:
            plan = decode.scheduler.add_remote(seq, first_token_id)
        except ValueError as err:
            self._send_op(prefill, lambda: prefill.scheduler.release_pinned(request.request_id))
            self._fail(request, str(err))
            return
        request.seq = seq
        if plan is None or not plan[1]:
            # Queued for a local recompute, or everything was cached here: no READ, so the
            # frontend-side release frees the prefill worker's copy.
            self._send_op(prefill, lambda: prefill.scheduler.release_pinned(request.request_id))
            if plan is not None:
                decode.scheduler.complete_remote(request.request_id, True)
            return
        num_bytes = len(plan[1]) * self.config.block_size * self.model.kv_bytes_per_token
        request.kv_transfer_bytes = num_bytes
        self._push(self.now_s + self.model.transfer_s(num_bytes), PULLED,
                   (decode, prefill, request))

    def _on_pulled(self, decode: SimWorker, prefill: SimWorker, request: SimRequest) -> None:
        rid = request.request_id
        self._deliver(decode, lambda: decode.scheduler.complete_remote(rid, True))
        self._deliver(prefill, lambda: prefill.scheduler.release_pinned(rid))

    def _on_finished(self, request: SimRequest) -> None:
        request.done = True
        # Its engine state is done with: a whole trace's sequences (token lists of 12k ids each)
        # kept to the end held gigabytes, and every full garbage collection walked them.
        request.seq = None
        self.router.on_finished(request.request_id)
        for send_s, index in self.clients.on_finished(request.index, self.now_s):
            self._push(send_s, SEND, index)

    def _fail(self, request: SimRequest, error: str) -> None:
        logger.warning("request %s failed: %s", request.request_id, error)
        request.error = error
        self._on_finished(request)

    # ---- router feeds --------------------------------------------------------------------------

    def _kv_listener(self, worker: SimWorker):
        if self.config.kv_event_delay_s <= 0:  # applied as it happens, with no frame between
            return partial(self.router.indexes[worker.role].apply, worker.worker_id)
        delay_s = self.config.kv_event_delay_s

        def on_event(event) -> None:
            self._push(self.now_s + delay_s, KV_EVENT, (worker, event))
        return on_event

    def _on_heartbeat(self) -> None:
        for worker in self.workers.values():
            self.registry.heartbeat(worker.worker_id, worker.stats(), self.now_s)
            self.router.on_worker_stats(worker.state)
        if self.clients.num_unfinished > 0:
            self._push(self.now_s + self.config.heartbeat_interval_s, HEARTBEAT, None)
