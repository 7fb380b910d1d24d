"""Conversions between gRPC messages and tandem's own types, shared by frontend and workers."""

from __future__ import annotations

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.contracts.outputs import Logprob
from tandem.contracts.sampling_params import SamplingParams
from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.contracts.worker_stats import Registration, WorkerStats

_STATS_FIELDS = tuple(WorkerStats.__dataclass_fields__)
_REGISTRATION_FIELDS = tuple(Registration.__dataclass_fields__)


def sampling_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logit_bias=params.logit_bias, min_tokens=params.min_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
        num_schema_prompt_tokens=params.num_schema_prompt_tokens)
    if params.max_tokens is not None:
        options.max_tokens = params.max_tokens
    if params.seed is not None:
        options.seed = params.seed
    if params.logprobs is not None:
        options.logprobs = params.logprobs
    if params.json_schema is not None:
        options.json_schema = params.json_schema
    return options


_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "skip_special_tokens")


def sampling_from_proto(options: pb.SamplingOptions, defaults: SamplingParams | None = None
                        ) -> SamplingParams:
    """Fields left unset take `defaults` (the model's generation config). Raises ValueError."""
    base = defaults or SamplingParams()
    picked = {name: getattr(options, name) if options.HasField(name) else getattr(base, name)
              for name in _DEFAULTED}
    return SamplingParams(
        max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
        seed=options.seed if options.HasField("seed") else None,
        stop=list(options.stop), stop_token_ids=list(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs if options.HasField("logprobs") else None,
        logit_bias=dict(options.logit_bias), min_tokens=options.min_tokens,
        include_stop_str_in_output=options.include_stop_str_in_output,
        json_schema=options.json_schema if options.HasField("json_schema") else None,
        num_schema_prompt_tokens=options.num_schema_prompt_tokens, **picked)


def logprob_to_proto(token_id: int, logprob: tuple[float, dict[int, float]]) -> pb.TokenLogprob:
    chosen, top = logprob
    return pb.TokenLogprob(token_id=token_id, logprob=chosen,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top.items()])


def logprob_from_proto(message: pb.TokenLogprob) -> Logprob:
    return Logprob(message.token_id, message.logprob, {t.token_id: t.logprob for t in message.top})


def kv_event_to_proto(event: KVEvent) -> wpb.KVEvent:
    if isinstance(event, BlockStored):
        stored = wpb.BlocksStored(has_parent=event.parent_hash is not None,
                                  parent_hash=event.parent_hash or 0,
                                  block_hashes=event.block_hashes)
        return wpb.KVEvent(event_id=event.event_id, stored=stored)
    if isinstance(event, BlockRemoved):
        return wpb.KVEvent(event_id=event.event_id,
                           removed=wpb.BlocksRemoved(block_hashes=event.block_hashes))
    return wpb.KVEvent(event_id=event.event_id, cleared=wpb.AllBlocksCleared())


def kv_event_from_proto(message: wpb.KVEvent) -> KVEvent:
    kind = message.WhichOneof("kind")
    if kind == "stored":
        stored = message.stored
        parent = stored.parent_hash if stored.has_parent else None
        return BlockStored(message.event_id, parent, tuple(stored.block_hashes))
    if kind == "removed":
        return BlockRemoved(message.event_id, tuple(message.removed.block_hashes))
    if kind == "cleared":
        return AllBlocksCleared(message.event_id)
    raise ValueError(f"KV event {message.event_id} has no kind")


def worker_stats_to_proto(stats: WorkerStats) -> wpb.WorkerStats:
    return wpb.WorkerStats(**{name: getattr(stats, name) for name in _STATS_FIELDS})


def worker_stats_from_proto(message: wpb.WorkerStats) -> WorkerStats:
    return WorkerStats(**{name: getattr(message, name) for name in _STATS_FIELDS})


def registration_to_proto(registration: Registration) -> wpb.RegisterRequest:
    return wpb.RegisterRequest(**{name: getattr(registration, name)
                                  for name in _REGISTRATION_FIELDS})


def registration_from_proto(message: wpb.RegisterRequest) -> Registration:
    return Registration(**{name: getattr(message, name) for name in _REGISTRATION_FIELDS})
