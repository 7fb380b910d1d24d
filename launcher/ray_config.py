"""The ray launcher's settings (`RayConfig`) and the placement spec of a worker pool.

A pool's placement (`--prefill-resources`, `--decode-resources`) is a JSON object or `k=v` pairs
(`prefill_node=1,zone=a`): a number asks Ray for that much of a custom resource on the node
(`ray start --resources '{"prefill_node": 8}'`), a string asks for a node label
(`ray start --labels zone=a`), so a user can put prefill on one kind of node and decode on another.
A YAML file may give the same as a mapping.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class PoolPlacement:
    resources: dict[str, float] = field(default_factory=dict)  # custom resource -> amount
    labels: dict[str, str] = field(default_factory=dict)       # node label -> value


@dataclass(frozen=True, slots=True)
class RayConfig:
    address: str | None = None        # None: start Ray on this machine; "auto" or host:port: join
    prefill_resources: str = ""       # placement of prefill actors (module docstring)
    decode_resources: str = ""        # placement of decode actors
    num_cpus_per_worker: float = 1.0  # CPU share each actor asks for (and torch threads on a CPU)

    def __post_init__(self) -> None:
        if not self.num_cpus_per_worker > 0:
            raise ValueError(f"ray_cpus_per_worker must be > 0, got {self.num_cpus_per_worker}")
        for role in ("prefill", "decode"):
            self.placement(role)  # raises ValueError on a malformed spec, at startup

    def placement(self, role: str) -> PoolPlacement:
        text = self.prefill_resources if role == "prefill" else self.decode_resources
        return parse_placement(text, f"{role}_resources")


def parse_placement(text: str, name: str) -> PoolPlacement:
    """`{"prefill_node": 1, "zone": "a"}` or `prefill_node=1,zone=a` -> PoolPlacement."""
    items = _parse_mapping(text.strip(), name)
    resources, labels = {}, {}
    for key, value in items.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name}: {key} must be a number (a resource) or a string (a node "
                             f"label), got {value!r}")
        number = _as_number(value)
        if number is None:
            labels[str(key)] = str(value)
        elif number < 0:
            raise ValueError(f"{name}: resource {key} must be >= 0, got {number}")
        else:
            resources[str(key)] = number
    return PoolPlacement(resources, labels)


def _parse_mapping(text: str, name: str) -> dict[str, Any]:
    if not text:
        return {}
    if text.startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            # A YAML mapping reaches here as Python's repr of a dict (single quotes).
            try:
                loaded = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"{name}: not a JSON object: {text!r}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{name}: expected an object, got {text!r}")
        return loaded
    pairs = {}
    for part in text.replace(",", " ").split():
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{name}: expected k=v pairs or a JSON object, got {part!r}")
        pairs[key] = value
    return pairs


def _as_number(value: int | float | str) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None
