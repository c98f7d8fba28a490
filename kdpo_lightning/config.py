"""The editor's knobs in groups, so that a config reads as method, target, constraints and loading.

Each group is a small frozen dataclass that jsonargparse reads from the CLI (`--model.target.layer 20`).
The flat names of earlier releases (`--model.layer 20`, `KDPOEditor.from_model(m, t, layer=20)`) still
work: `group_flat` and `FLAT_FLAGS` map them to their group.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .loop import EditConfig


@dataclass(frozen=True)
class Target:
    """Which tensors train and how the edit's forwards are computed."""

    layer: int | None = None
    """Decoder layer whose MLP output projection trains (None: 2/3 of the depth; the paper: 21 of 32)."""
    trainable: list[str] | None = None
    """Regexes of parameter names to train instead of the default tensor."""
    reference: str | None = None
    """cached (KDPO's default), swap (vanilla DPO's) or copy: where the reference's log-probs come from."""
    prefix_cache: bool = True
    """Run the layers below the trained one once per edit (exact)."""


@dataclass(frozen=True)
class Constraints:
    """Limits on the trained tensors against forgetting in long edit sequences (off by default)."""

    nullspace_threshold: float | None = None
    """Project each update onto the null space of preserved keys and earlier edits' keys (AlphaEdit's
    projection): eigenvalues below threshold x the largest. None: off."""
    nullspace_texts: int = 1000
    """HellaSwag contexts and MMLU questions each, for the preserved keys (also MEMIT/AlphaEdit's covariance).
    0: no preserved text; the null space protects only earlier edits' keys (P = I before the first edit)."""
    max_change: float | None = None
    """Keep ||W - W_0||_F <= max_change x ||W_0||_F, W_0 the tensor before the first edit. None: off."""
    key_span: bool = False
    """Keep each update within the span of the edit's own keys (the trained projection's inputs on c+y_w and
    its replays): the edit is made as without it, inputs outside that span do not move. False: the paper."""


@dataclass(frozen=True)
class Loading:
    """How the model is loaded and placed."""

    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16. bf16 is for GPUs: CPUs run it slowly."""
    device_map: str | dict[str, Any] | None = None
    """Spread the model over devices with accelerate (`auto` or {module: device})."""
    max_memory: dict[str, str] | None = None
    """Per-device memory limits for `device_map: auto`, e.g. {0: "70GiB", "cpu": "200GiB"}."""
    trust_remote_code: bool = False
    """Allow model code from the model directory or hub repo."""
    allow_pickle: bool = False
    """Allow pickled (non-safetensors) weights."""
    offload_after_fit: bool = False
    """Move the model to the CPU when a fit ends, as Lightning does by default (seconds for an 8B model);
    off: it stays where it was edited."""

    def load_model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `models.load_model`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "offload_after_fit"}


GROUPS: dict[str, type] = {"edit": EditConfig, "target": Target, "constraints": Constraints, "load": Loading}
"""The editor's dataclass groups; `edit` is the method and its schedule."""
EDIT_MODES = ("sequential", "single")


def check_edit_mode(edit_mode: str, world_size: int) -> None:
    """Sequential edits build on each other, so they cannot be split over processes."""
    if edit_mode not in EDIT_MODES:
        raise ValueError(f"edit_mode must be one of {EDIT_MODES}, got {edit_mode!r}")
    if edit_mode == "sequential" and world_size > 1:
        raise ValueError(f"sequential edits build on each other and cannot be split over {world_size} processes: "
                         "use model.edit_mode: single, or one process with model.load.device_map to spread a large "
                         "model over devices")


def group_flat(groups: dict[str, type], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move flat keyword arguments that name a field of a group into that group's dataclass;
    `kwargs` may also pass a whole group (a dataclass or a dict)."""
    out = dict(kwargs)
    for group, cls in groups.items():
        given = out.pop(group, None)
        values = dict(given) if isinstance(given, dict) else ({f.name: getattr(given, f.name) for f in fields(cls)}
                                                               if given is not None else {})
        values.update({f.name: out.pop(f.name) for f in fields(cls) if f.name in out})
        out[group] = cls(**values)
    return out


def flat_flags(groups: dict[str, type], prefix: str = "model") -> dict[str, str]:
    """{old flag: new flag} for every group field, e.g. `--model.layer` -> `--model.target.layer`."""
    return {f"--{prefix}.{f.name}": f"--{prefix}.{group}.{f.name}"
            for group, cls in groups.items() for f in fields(cls)}
