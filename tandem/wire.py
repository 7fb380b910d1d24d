"""Conversions between gRPC messages and tandem's own types, shared by frontend and workers."""

from __future__ import annotations

from tandem.api.v1 import generation_pb2 as pb
from tandem.engine.outputs import Logprob
from tandem.engine.sampling_params import SamplingParams


def sampling_to_proto(params: SamplingParams) -> pb.SamplingOptions:
    options = pb.SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos)
    if params.max_tokens is not None:
        options.max_tokens = params.max_tokens
    if params.seed is not None:
        options.seed = params.seed
    if params.logprobs is not None:
        options.logprobs = params.logprobs
    return options


def sampling_from_proto(options: pb.SamplingOptions, defaults: SamplingParams | None = None
                        ) -> SamplingParams:
    """Fields left unset take `defaults` (the model's generation config). Raises ValueError."""
    base = defaults or SamplingParams()

    def pick(name: str):
        return getattr(options, name) if options.HasField(name) else getattr(base, name)

    return SamplingParams(
        max_tokens=options.max_tokens if options.HasField("max_tokens") else None,
        temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
        min_p=pick("min_p"),
        seed=options.seed if options.HasField("seed") else None,
        stop=list(options.stop), stop_token_ids=list(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        logprobs=options.logprobs if options.HasField("logprobs") else None)


def logprob_to_proto(token_id: int, logprob: tuple[float, dict[int, float]]) -> pb.TokenLogprob:
    chosen, top = logprob
    return pb.TokenLogprob(token_id=token_id, logprob=chosen,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top.items()])


def logprob_from_proto(message: pb.TokenLogprob) -> Logprob:
    return Logprob(message.token_id, message.logprob, {t.token_id: t.logprob for t in message.top})
