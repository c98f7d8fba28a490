"""Constraints on the trained tensors against forgetting in long edit sequences: each is shown an edit's
sequences at its start (`begin_edit`) and applied after every optimizer step (`apply`). The objective's
other variant, the NLL anchor, is in `objective.py`.

- `NullSpace` (AlphaEdit, Fang et al. 2025): each step's update dW is replaced by dW P, P the
  projector onto the null space of the keys (inputs of the trained projection) of preserved text
  and of earlier edits, so (dW P) k ~ 0 for those keys: their outputs do not move. With no preserved
  text (`nullspace_texts: 0`) only earlier edits' keys are protected; before the first edit P = I.
- `NormBound` (ENCORE, NAS): the change of the tensor since the first edit is kept within a
  fraction of its norm.
- `KeySpan`: each step's update is kept within the span of the edit's own keys. The edit's forward reads
  the trained projection only through those keys, so it runs as without the constraint, while every input
  outside that span is left alone: what Adam's elementwise step spreads elsewhere is dropped.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .objective import bound_change, null_space_projector, span_basis


class NormBound:
    """||W - W_0||_F <= max_ratio * ||W_0||_F, W_0 the tensor before the first edit."""

    def __init__(self, params: dict[str, Tensor], max_ratio: float) -> None:
        if not max_ratio > 0:
            raise ValueError(f"max_change must be positive, got {max_ratio}")
        self.max_ratio = max_ratio
        self.original = {name: p.detach().clone() for name, p in params.items()}

    def begin_edit(self, sequences: Sequence[Tensor]) -> None:
        """The bound is on the change since the first edit: nothing to read per edit."""

    def apply(self, name: str, value: Tensor, previous: Tensor) -> None:
        value.copy_(bound_change(value, self.original[name].to(value.device), self.max_ratio))

    def state_dict(self) -> dict:
        return {"original": self.original}

    def load_state_dict(self, state: dict) -> None:
        self.original = state["original"]


def projection_module(model: nn.Module, name: str) -> nn.Module:
    """The Linear or Conv1D that owns parameter `name` (a `.weight`)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if not isinstance(module, (nn.Linear, Conv1D)) or not name.endswith(".weight"):
        raise ValueError(f"the null-space constraint needs Linear/Conv1D weights; {name} is not one")
    return module


class _InputsSeen(Exception):
    """Stops a forward once every hooked projection has seen its input: the layers above add nothing."""


@torch.no_grad()
def projection_inputs(model: nn.Module, modules: dict[str, nn.Module], ids: Tensor) -> dict[str, Tensor]:
    """Each module's input (batch, tokens, features) when the model reads `ids`. The forward stops
    after the last of them, not at the LM head."""
    inputs: dict[str, Tensor] = {}

    def hook(name: str):
        def record(module, args):
            inputs.setdefault(name, args[0])
            if len(inputs) == len(modules):
                raise _InputsSeen
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        model(input_ids=ids, use_cache=False)
    except _InputsSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def key_size(module: nn.Module) -> int:
    """The width of a Linear's or Conv1D's input (a key)."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def key_covariances(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Tensor]) -> dict[str, Tensor]:
    """Mean k k^T over every token's input k to each of `modules` when the model reads `batches` of ids
    (one unpadded sequence each); zero for no batches (no keys)."""
    totals: dict[str, Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    for ids in batches:
        for name, inputs in projection_inputs(model, modules, ids).items():
            keys = inputs.reshape(-1, inputs.shape[-1]).double()
            totals[name] = totals.get(name, 0) + keys.T @ keys
            counts[name] += keys.shape[0]
    return {name: (totals[name] / counts[name]).float() if counts[name] else torch.zeros(key_size(m), key_size(m))
            for name, m in modules.items()}


class NullSpace:
    """Projects every step's update of each trained weight onto the null space of preserved keys
    (a covariance per weight, computed once per model and cached) plus the keys of earlier edits."""

    def __init__(self, model: nn.Module, covariances: dict[str, Tensor], threshold: float) -> None:
        self.model, self.threshold = model, threshold
        self.preserved = covariances
        self.edited = {name: torch.zeros_like(c) for name, c in covariances.items()}
        self.n_edits = 0
        self.projectors: dict[str, Tensor] = {}
        for name in covariances:
            self._update_projector(name)
        self.layout = {name: isinstance(projection_module(model, name), Conv1D) for name in covariances}

    def state_dict(self) -> dict:
        return {"edited": self.edited, "n_edits": self.n_edits}

    def load_state_dict(self, state: dict) -> None:
        self.edited, self.n_edits = state["edited"], state["n_edits"]
        for name in self.preserved:
            self._update_projector(name)

    def _update_projector(self, name: str) -> None:
        covariance = self.preserved[name] + (self.edited[name] / self.n_edits if self.n_edits else 0)
        self.projectors[name] = null_space_projector(covariance, self.threshold)

    def begin_edit(self, sequences: Sequence[Tensor]) -> None:
        """The projectors change when an edit is done (`add_edit`), not when one starts."""

    def apply(self, name: str, value: Tensor, previous: Tensor) -> None:
        delta, P = value - previous, self.projectors[name].to(value.device)
        value.copy_(previous + (P @ delta if self.layout[name] else delta @ P))

    @torch.no_grad()
    def add_edit(self, input_ids: Tensor, target_start: int) -> None:
        """Protect an applied edit too: add its keys at the positions that predict y_w (the mean
        over edits, weighted like the preserved set) and recompute the projectors."""
        self.n_edits += 1
        modules = {name: projection_module(self.model, name) for name in self.preserved}
        for name, inputs in projection_inputs(self.model, modules, input_ids).items():
            k = inputs[0, target_start - 1 : -1].double()
            self.edited[name] += ((k.T @ k) / k.shape[0]).float().to(self.edited[name].device)
            self._update_projector(name)


class KeySpan:
    """dW -> dW Q Q^T, Q a basis of the span of the edit's keys: the trained projection's inputs at every
    position of c+y_w but the last (the ones a target row reads), replays' included. (dW Q Q^T) k = dW k for
    those keys, so the edit's losses and y_l are the unconstrained ones; exact when one layer trains (a lower
    trained layer would move a higher one's keys) and for kdpo and ftm (vanilla DPO also reads c+y_l)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.modules = {name: projection_module(model, name) for name in names}
        self.layout = {name: isinstance(module, Conv1D) for name, module in self.modules.items()}
        self.bases: dict[str, Tensor] = {}

    @torch.no_grad()
    def begin_edit(self, sequences: Sequence[Tensor]) -> None:
        """Read the keys of an edit's sequences (each (1, T) ids: c+y_w, then its replays') at its start."""
        keys: dict[str, list[Tensor]] = {name: [] for name in self.modules}
        for ids in sequences:
            for name, inputs in projection_inputs(self.model, self.modules, ids).items():
                keys[name].append(inputs[0, :-1])
        self.bases = {name: span_basis(torch.cat(k)) for name, k in keys.items()}

    def apply(self, name: str, value: Tensor, previous: Tensor) -> None:
        if name not in self.bases:
            raise RuntimeError("KeySpan.begin_edit was not called for this edit (Policy.begin_edit passes its ids)")
        delta, Q = value - previous, self.bases[name].to(value.device)
        value.copy_(previous + (Q @ (Q.T @ delta) if self.layout[name] else (delta @ Q) @ Q.T))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing outlives an edit."""


def preserved_batches(tokenizer, n: int, seed: int, device: torch.device) -> list[Tensor]:
    """Generic text whose keys the null space preserves: `n` HellaSwag contexts and `n` MMLU
    questions (found on the data search path as general/*), one sequence per batch."""
    from .capability import load_questions

    texts = [q.contexts[0] for name in ("hellaswag", "mmlu") for q in load_questions(name, n, seed)]
    return [torch.tensor([tokenizer(t)["input_ids"]], device=device) for t in texts]


def cached_covariances(model: nn.Module, tokenizer, names: Sequence[str], n_texts: int, model_id: str,
                       device: torch.device) -> dict[str, Tensor]:
    """The preserved-key covariance of each trained weight, computed once per (model id, covered weights,
    texts, dtype) and kept under the kdpo-lightning cache as safetensors, so a changed model under the
    same name is not served stale covariances.

    The key is a sha256 over the token ids of the texts and every parameter the projections' inputs
    depend on (`covered_parameters`, hashed by `models.hash_parameters`: LLaMA-3-8B up to layer 21,
    10.6 GB in bf16, takes 6-14 s). `n_texts` 0 preserves no text: zero covariances, computed here
    without the disk."""
    from safetensors.torch import load_file, save_file

    from .models import cache_root, hash_parameters
    from .saving import atomic_write

    if n_texts < 0:
        raise ValueError(f"nullspace_texts must be 0 or more, got {n_texts}")
    modules = {name: projection_module(model, name) for name in names}
    if n_texts == 0:
        return {name: c.cpu() for name, c in key_covariances(model, modules, []).items()}
    batches = preserved_batches(tokenizer, n_texts, 0, device)
    digest = hashlib.sha256(json.dumps([model_id, sorted(names), n_texts]).encode())
    hash_parameters(digest, covered_parameters(model, names))
    for ids in batches:
        digest.update(ids.cpu().numpy())
    path = cache_root() / "covariance" / f"{digest.hexdigest()[:16]}.safetensors"
    if path.is_file():
        return load_file(str(path))
    covariances = {name: c.cpu() for name, c in key_covariances(model, modules, batches).items()}
    with atomic_write(path) as tmp:
        save_file(covariances, str(tmp))
    return covariances


def covered_parameters(model: nn.Module, names: Sequence[str]) -> list[tuple[str, Tensor]]:
    """The parameters the inputs of the projections `names` can depend on: every parameter registered
    up to the end of the deepest of their layers (transformers registers the embeddings, then the layers
    in order), the layers themselves included."""
    layers = {_layer_prefix(name) for name in names}
    params = list(model.named_parameters())
    last = max(i for i, (name, _) in enumerate(params) if name.startswith(tuple(layers)))
    return params[: last + 1]


def _layer_prefix(name: str) -> str:
    """The layer a parameter is in, up to its first numeric part (`model.layers.21.` for
    `model.layers.21.mlp.down_proj.weight`); the name itself when it has none."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[: index + 1]) + "."


def build_constraints(model: nn.Module, tokenizer, params: dict[str, Tensor], limits, model_id: str,
                      states: Sequence[dict] = ()) -> list:
    """The constraints `limits` (a `config.Constraints`) asks for on the trained `params`: the edit's key span,
    the null space (covariance cached on disk) and the norm bound, [] when all are off; `states` restore a
    checkpoint's."""
    constraints: list = [KeySpan(model, list(params))] if limits.key_span else []
    if limits.nullspace_threshold is not None:
        device = next(model.parameters()).device
        covariances = cached_covariances(model, tokenizer, list(params), limits.nullspace_texts, model_id, device)
        constraints.append(NullSpace(model, covariances, limits.nullspace_threshold))
    if limits.max_change is not None:
        constraints.append(NormBound(params, limits.max_change))
    for constraint, state in zip(constraints, states):
        constraint.load_state_dict(state)
    return constraints
