"""The model under edit: which tensors train, and forwards that return only target-position rows.

Prefix caching: only one layer's tensors train, so the layers below it give the same output for
the whole edit. Their output on c+y_w is computed once; each step re-runs only the edited layer
and those above it. Exact, because the same modules run on the same inputs.
"""
from __future__ import annotations

import difflib
import re
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

# Per family: (attribute path of the module holding the decoder layers, name of the layer list,
# default trained tensor with {layer} for the layer index; the paper's choice for LLaMA, EasyEdit's
# FT-M choice for GPT-2).
_FAMILIES = {
    "llama": ("model", "layers", "model.layers.{layer}.mlp.down_proj.weight"),
    "qwen2": ("model", "layers", "model.layers.{layer}.mlp.down_proj.weight"),
    "mistral": ("model", "layers", "model.layers.{layer}.mlp.down_proj.weight"),
    "gpt2": ("transformer", "h", "transformer.h.{layer}.mlp.c_proj.weight"),
}
_PREFIX_CACHE_FAMILIES = ("llama", "qwen2", "gpt2")


def default_layer(n_layers: int) -> int:
    """About two thirds of the depth, as in the paper: LLaMA-3-8B (32 layers) -> 21, 30 -> 20, 12 -> 8."""
    return (2 * n_layers) // 3


def default_trainable(model: nn.Module, layer: int | None = None) -> str:
    """The paper's trained tensor for this architecture: one MLP down-projection."""
    family = model.config.model_type
    if family not in _FAMILIES:
        raise ValueError(
            f"no default trained tensor for model type {family!r}; set `trainable` to a parameter name "
            f"pattern (known defaults: {sorted(_FAMILIES)})"
        )
    n_layers = model.config.num_hidden_layers
    layer = default_layer(n_layers) if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layers} layers")
    return re.escape(_FAMILIES[family][2].format(layer=layer))


def select_trainable(model: nn.Module, patterns: str | list[str]) -> dict[str, nn.Parameter]:
    """Freeze every parameter except those whose full name matches one of the regex `patterns`."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [name for name, _ in model.named_parameters()]
    chosen = {}
    for pattern in patterns:
        hits = [n for n in names if re.fullmatch(pattern, n)]
        if not hits:
            close = difflib.get_close_matches(pattern.replace("\\", ""), names, n=5, cutoff=0.3)
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter; closest names: {close}")
        chosen.update({n: None for n in hits})
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in chosen)
    return {name: params[name] for name in chosen}


def _layer_index(name: str, layer_list: str) -> int | None:
    match = re.search(rf"\.{layer_list}\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def input_key(input_ids: Tensor) -> tuple:
    """A hashable key of a batch of token ids (shape and values), for per-input caches."""
    return tuple(input_ids.shape) + tuple(input_ids.flatten().tolist())


def target_rows(model: nn.Module, n_target: int, **inputs: Tensor) -> Tensor:
    """Log-softmax rows predicting the last `n_target` tokens: (B, n_target, V), fp32.

    Only the last n_target + 1 positions go through the LM head (the row at t predicts t+1)."""
    logits = model(**inputs, logits_to_keep=n_target + 1, use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1)


class _Zeros(nn.Module):
    """Stands in for GPT-2's position embedding when the cached input already contains it."""

    def __init__(self, like: nn.Embedding) -> None:
        super().__init__()
        self.dim, self.dtype = like.embedding_dim, like.weight.dtype

    def forward(self, position_ids: Tensor) -> Tensor:
        return torch.zeros(*position_ids.shape, self.dim, dtype=self.dtype, device=position_ids.device)


class _StopForward(Exception):
    pass


class Policy:
    """The model being edited, its trained tensors, and target-row forwards with a prefix cache."""

    def __init__(self, model: nn.Module, trainable: str | list[str] | None = None, layer: int | None = None,
                 prefix_cache: bool = True) -> None:
        self.model = model
        self.params = select_trainable(model, trainable or default_trainable(model, layer))
        self.start = self._prefix_start() if prefix_cache else None
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def _prefix_start(self) -> int | None:
        family = self.model.config.model_type
        if family not in _PREFIX_CACHE_FAMILIES:
            warnings.warn(f"prefix caching does not support model type {family!r}; using full forwards")
            return None
        layer_list = _FAMILIES[family][1]
        layers = [_layer_index(name, layer_list) for name in self.params]
        if None in layers:  # a trained tensor outside the decoder layers: nothing below it is fixed
            return None
        return min(layers) or None

    def begin_edit(self) -> None:
        """Forget cached prefixes (they are only valid while the layers below stay as they are)."""
        self._cache.clear()

    def original_values(self) -> dict[str, Tensor]:
        """A copy of the trained tensors, to restore or swap in later."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load_values(self, values: dict[str, Tensor]) -> None:
        """Write `values` into the trained tensors in place (optimizer state stays attached)."""
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(value)

    def rows(self, input_ids: Tensor, n_target: int) -> Tensor:
        """Log-softmax rows predicting the last `n_target` tokens: input (B, T) -> (B, n_target, V)."""
        if self.start is None:
            return target_rows(self.model, n_target, input_ids=input_ids)
        hidden = self._prefix(input_ids)
        with self._upper_stack():
            return target_rows(self.model, n_target, inputs_embeds=hidden)

    def _stack(self) -> tuple[nn.Module, str]:
        holder, layer_list, _ = _FAMILIES[self.model.config.model_type]
        return getattr(self.model, holder), layer_list

    def _prefix(self, input_ids: Tensor) -> Tensor:
        """Hidden states entering layer `start`, computed once per distinct input within an edit."""
        key = input_key(input_ids)
        if key not in self._cache:
            holder, layer_list = self._stack()
            captured = {}

            def capture(module, args, kwargs):
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
                raise _StopForward

            handle = getattr(holder, layer_list)[self.start].register_forward_pre_hook(capture, with_kwargs=True)
            try:
                with torch.no_grad():
                    self.model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            self._cache[key] = captured["hidden"]
        return self._cache[key]

    @contextmanager
    def _upper_stack(self) -> Iterator[None]:
        """Temporarily make the model's layer list hold only layers `start`.. (and, for GPT-2, make
        the position embedding add zero), so feeding the cached hidden states as `inputs_embeds`
        runs exactly the upper part of the network."""
        holder, layer_list = self._stack()
        full = getattr(holder, layer_list)
        setattr(holder, layer_list, nn.ModuleList(list(full)[self.start :]))
        wpe = getattr(holder, "wpe", None)
        if wpe is not None:
            holder.wpe = _Zeros(wpe)
        try:
            yield
        finally:
            setattr(holder, layer_list, full)
            if wpe is not None:
                holder.wpe = wpe
