"""The profiles tandem ships (planner/profiles/), and which one a deployment gets by default.

A profile is named `<model>-<device>.json`: the model as `tandem serve --model` names it, with
`:` and `/` turned into `-` (random:tiny -> random-tiny), and the device kind (`cpu`, or the GPU's
short name, e.g. `h200`). The online planner sizes pools with the performance model fitted from
it; a deployment with no matching profile must name one (`--planner-profile`), or measure one with
`tandem profile`, because sizing from another device's or model's times would be wrong silently.
"""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).parent / "profiles"


def profile_name(model: str, device_kind: str) -> str:
    slug = model.strip("/").replace(":", "-").replace("/", "-").lower()
    return f"{slug}-{device_kind.lower()}.json"


def device_kind(device: str) -> str:
    """`cpu`, or the short name of the GPU behind a cuda device (`NVIDIA H200` -> `h200`)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.cuda.get_device_name(index).split()[-1].lower()


def default_profile(model: str, device: str) -> str:
    """The shipped profile of this model on this device; ValueError naming what to do if none."""
    kind = device_kind(device)
    path = PROFILES_DIR / profile_name(model, kind)
    if not path.exists():
        shipped = sorted(p.name for p in PROFILES_DIR.glob("*.json"))
        raise ValueError(
            f"no shipped planner profile for {model} on {kind} (looked for {path.name}; shipped: "
            f"{', '.join(shipped) or 'none'}). Measure one with `tandem profile --model {model} "
            f"--device {device} --out PROFILE.json` and pass --planner-profile PROFILE.json")
    return str(path)
