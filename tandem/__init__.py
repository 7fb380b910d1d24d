"""tandem: disaggregated LLM serving.

`from tandem import LLM, SamplingParams` is the offline API; `tandem serve` is the server.
"""

from tandem.contracts.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from tandem.launcher.llm import LLM
        return LLM
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
