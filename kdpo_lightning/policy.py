"""The model under edit: which tensors train, and forwards that return only target-position rows.

Architecture discovery: the decoder layers are the ModuleList of `num_hidden_layers` blocks; in a
layer, the MLP's output projection is the weight outside attention that maps a wider size back to
the hidden size (down_proj, c_proj, fc_out, dense_4h_to_h, fc2, ...). No per-family table.

Precision: in a bf16/fp16 model an Adam step of lr 1e-4 is below the resolution of most entries
of the trained tensor and rounds away. So the optimizer trains an fp32 master copy; gradients are
routed into it during an edit, and after each step it is rounded into the model's own tensor.

Prefix caching: only the trained tensor changes during an edit, so everything the forward computes
before it is fixed. Per input, the layers below the trained one are run once and their output is
replayed; where the trained layer's output is a residual plus the output of the module holding
the trained tensor (checked once, bitwise), that residual and the module's input are replayed too,
so a step runs only that module, the layers above it and the head. Everything outside the layers
(embeddings, position and mask computation, the head) runs as usual: the same modules see the
same inputs, so the cache is exact.

The Policy is a guest in the caller's model: it records every `requires_grad` flag and hook it
changes, patches a module's `forward` only for the length of one forward, and `close()` puts
everything back.
"""
from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

OUTPUT_PROJECTION_NAMES = ("down_proj", "w2", "fc2", "c_proj", "fc_out", "dense_4h_to_h", "wo", "out_proj")
"""Names of fused expert tensors (num_experts, ...) taken as output projections; their layout
varies by family, so for them the name decides, not the shape."""
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def default_layer(n_layers: int) -> int:
    """About two thirds of the depth, as in the paper: LLaMA-3-8B (32 layers) -> 21, 30 -> 20, 12 -> 8."""
    return (2 * n_layers) // 3


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the first ModuleList of `num_hidden_layers` blocks, with its name."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError(f"no list of {n_layers} decoder layers in {type(model).__name__}; set `trainable` to a "
                     "parameter name pattern (the prefix cache is then off)")


def output_projections(layer: nn.Module, hidden_size: int) -> list[str]:
    """Parameter names, relative to `layer`, of its MLP output projection(s): the Linear/Conv1D
    weights outside attention that map another size to `hidden_size`, and fused expert tensors
    named like one. In an MoE layer that is every expert's projection and any shared expert's."""
    found = []
    for path, module in layer.named_modules():
        if _ATTENTION.search(path):
            continue
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.Linear):
            if module.out_features == hidden_size != module.in_features:
                found.append(f"{prefix}weight")
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            if module.nf == hidden_size != module.weight.shape[0]:
                found.append(f"{prefix}weight")
        else:
            found += [f"{prefix}{name}" for name, p in module.named_parameters(recurse=False)
                      if p.ndim == 3 and name in OUTPUT_PROJECTION_NAMES]
    return found


def default_trainable(model: nn.Module, layer: int | None = None) -> list[str]:
    """The paper's trained tensor for any decoder-only model: the MLP output projection of `layer`
    (default: 2/3 of the depth), as exact-name patterns."""
    list_name, layers = find_layers(model)
    layer = default_layer(len(layers)) if layer is None else layer
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range for a model with {len(layers)} layers")
    names = output_projections(layers[layer], model.config.get_text_config().hidden_size)
    if not names:
        raise ValueError(f"found no MLP output projection in {list_name}.{layer} of {type(model).__name__}; set "
                         f"`trainable` to parameter name patterns (e.g. '{list_name}\\.{layer}\\.mlp\\..*down.*')")
    return [re.escape(f"{list_name}.{layer}.{name}") for name in names]


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


SKINNY_HEAD_ROWS = range(2, 8)
"""Row counts for which an fp32 LM head on CPU runs as (W @ x^T)^T (see `skinny_linear`)."""


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), computed as (W @ x^T)^T for 2-7 fp32 rows on CPU, where the CPU's
    GEMM runs an LM head's shape (V x H, V >> H) faster in that layout: forward and backward
    1.1-1.7x on one thread at V x H = 32000 x 768, 49152 x 576 and 151936 x 896 (8 rows: 0.92x
    at the last). Any other input goes to F.linear unchanged."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows not in SKINNY_HEAD_ROWS:
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


@contextmanager
def replaced_forwards(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Run modules with other forward functions for a while. Each module keeps its place and
    attributes, so the model's own code runs unchanged around it; an instance-level `forward`
    another library set (e.g. accelerate's hooks) is put back afterwards."""
    saved = {module: module.__dict__.get("forward") for module in replacements}
    for module, forward in replacements.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@contextmanager
def _skinny_head(model: nn.Module) -> Iterator[None]:
    """The model's LM head as `skinny_linear`, if it is a plain Linear nobody else has patched."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or "forward" in head.__dict__:
        yield
        return
    with replaced_forwards({head: lambda x: skinny_linear(x, head.weight, head.bias)}):
        yield


def _model_inputs(input_ids: Tensor, **padding: Tensor) -> dict[str, Tensor]:
    """The keyword inputs of a forward that predicts the tokens of `input_ids`: it and its `padding`
    (attention_mask, position_ids of a left-padded batch), each without the last position."""
    return {name: t[:, :-1] for name, t in {"input_ids": input_ids, **padding}.items()}


def target_rows(model: nn.Module, n_target: int, input_ids: Tensor, **padding: Tensor) -> Tensor:
    """Log-softmax rows predicting the last `n_target` tokens of `input_ids`: (B, n_target, V), fp32.

    The last token is not run (its row would predict past the end), and only the last n_target
    positions go through the LM head. `padding` (attention_mask, position_ids) is given for a
    left-padded batch, whose rows all end at the last position."""
    with _skinny_head(model):
        logits = model(**_model_inputs(input_ids, **padding), logits_to_keep=n_target, use_cache=False).logits
    return logits.float().log_softmax(-1)


class PerInput:
    """Values computed once per input tensor within an edit. Keyed on the tensor object, not its
    values, so a lookup never waits for the device; callers pass the same tensor for the same
    input and never change it in place. Holding the tensor keeps its id from being reused."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, Any]] = {}

    def clear(self) -> None:
        self._entries.clear()

    def get(self, tensor: Tensor, compute: Callable[[], Any]) -> Any:
        if id(tensor) not in self._entries:
            self._entries[id(tensor)] = (tensor, compute())
        return self._entries[id(tensor)][1]

    def put(self, tensor: Tensor, value: Any) -> None:
        self._entries[id(tensor)] = (tensor, value)


class _StopForward(Exception):
    pass


def _keep(seen: dict[str, Any], key: str) -> Callable[..., None]:
    """A forward hook storing the module's output in `seen[key]` (and leaving the output as it is)."""
    return lambda module, args, output: seen.update({key: output})


def _run_until(model: nn.Module, inputs: dict[str, Tensor], last: nn.Module, hooks: list[RemovableHandle]) -> None:
    """A no-grad forward of `inputs` (`_model_inputs`), stopped after module `last`; `hooks`
    (registered by the caller) are removed afterwards."""

    def stop(module, args, output):
        raise _StopForward

    hooks.append(last.register_forward_hook(stop))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()


def layer_output(model: nn.Module, layer: nn.Module, **inputs: Tensor) -> Any:
    """What `layer` returns in a no-grad forward of the model's `inputs` (hidden states, or a tuple starting
    with them); the forward stops there."""
    seen: dict[str, Any] = {}
    _run_until(model, inputs, layer, [layer.register_forward_hook(_keep(seen, "output"))])
    return seen["output"]


@dataclass
class _Fixed:
    """The fixed part of one input's forward: the output of the layers below the trained one and,
    in projection mode, the trained layer's residual and the trained module's call arguments."""

    lower: Any
    residual: Tensor | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    rest: tuple | None = None
    """The layer's other outputs, for a layer that returns a tuple (hidden states first)."""

    def layer_output(self, owner_output: Tensor) -> Any:
        """The trained layer's output for this input, given the owner's output."""
        hidden = self.residual + owner_output.reshape(self.residual.shape)
        return hidden if self.rest is None else (hidden, *self.rest)


def split_hidden(output: Any) -> tuple[Any, tuple | None]:
    """A layer's output split into its hidden states and the rest of a tuple (None for a tensor)."""
    return (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)


class PrefixCache:
    """Replays, per input, what the trained tensor cannot change (see the module docstring).

    Layer mode: layers 0..start-1 return their captured output. Projection mode, in addition: the
    trained layer returns its captured residual plus `owner` (the one module holding the layer's
    trained tensors) run on its captured arguments. Projection mode is taken if, on the first
    input, the layer's output equals residual + owner output bitwise, the residual being the
    layer's output with the owner's output zeroed: true for `h + mlp(h)` layers, false where a norm
    or a gate follows the projection (Gemma-2, Qwen2-MoE's shared expert) or the sum is grouped
    otherwise (parallel attention), which then keep layer mode."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], start: int, owner: nn.Module | None) -> None:
        self.model, self.start, self.owner = model, start, owner
        self.lower, self.layer = layers[:start], layers[start]
        self.projection: bool | None = None if owner is not None else False
        """Projection mode; None until the first input decides it."""
        self._fixed = PerInput()

    def clear(self) -> None:
        self._fixed.clear()

    @contextmanager
    def replay(self, input_ids: Tensor, **padding: Tensor) -> Iterator[None]:
        """Within this block, forwards of `input_ids` skip its fixed part (captured on first sight).
        The key is the `input_ids` tensor: a batch comes with the same `padding` every time."""
        fixed = self._fixed.get(input_ids, lambda: self._capture(_model_inputs(input_ids, **padding)))
        replacements = {layer: lambda *args, **kwargs: fixed.lower for layer in self.lower}
        if self.projection:
            replacements[self.layer] = lambda *args, **kwargs: fixed.layer_output(
                self.owner(*fixed.args, **fixed.kwargs))
        with replaced_forwards(replacements):
            yield

    def _capture(self, inputs: dict[str, Tensor]) -> _Fixed:
        """One no-grad forward, stopped after the last fixed layer. Unless in layer mode, the owner's
        output is zeroed in it, so the trained layer outputs its residual alone."""
        seen: dict[str, Any] = {"calls": []}
        hooks = [self.lower[-1].register_forward_hook(_keep(seen, "lower"))]
        if self.projection is False:
            _run_until(self.model, inputs, self.lower[-1], hooks)
            return _Fixed(seen["lower"])
        hooks += [
            self.owner.register_forward_pre_hook(lambda module, args, kwargs: seen["calls"].append((args, kwargs)),
                                                 with_kwargs=True),
            self.owner.register_forward_hook(lambda module, args, out: torch.zeros_like(out)
                                             if isinstance(out, Tensor) else None),
            self.layer.register_forward_hook(_keep(seen, "residual")),
        ]
        _run_until(self.model, inputs, self.layer, hooks)
        residual, rest = split_hidden(seen["residual"])
        fixed = _Fixed(seen["lower"], residual, *(seen["calls"][0] if seen["calls"] else ((), {})), rest)
        if self.projection is None:
            self.projection = len(seen["calls"]) == 1 and self._is_additive(inputs, fixed)
        return fixed if self.projection else _Fixed(fixed.lower)

    def _is_additive(self, inputs: dict[str, Tensor], fixed: _Fixed) -> bool:
        """Whether the trained layer's real output is bitwise its residual plus the owner's output
        (one more no-grad forward of that layer, the layers below replayed)."""
        seen: dict[str, Any] = {}
        hooks = [self.owner.register_forward_hook(_keep(seen, "owner")),
                 self.layer.register_forward_hook(_keep(seen, "layer"))]
        with replaced_forwards({layer: lambda *args, **kwargs: fixed.lower for layer in self.lower}):
            _run_until(self.model, inputs, self.layer, hooks)
        owner, layer, residual = seen["owner"], split_hidden(seen["layer"])[0], fixed.residual
        return (all(isinstance(t, Tensor) for t in (owner, layer, residual)) and owner.numel() == layer.numel()
                and layer.shape == residual.shape and torch.equal(layer, residual + owner.reshape(layer.shape)))


class Policy:
    """The model being edited, its trained tensors (fp32), and target-row forwards with a prefix cache.

    An edit runs between `begin_edit()` and `end_edit()`; `close()` (or leaving a `with` block)
    gives the model back with its hooks and `requires_grad` flags as they were."""

    def __init__(self, model: nn.Module, trainable: str | list[str] | None = None, layer: int | None = None,
                 prefix_cache: bool = True) -> None:
        self.model = model
        self._flags = [(param, param.requires_grad) for param in model.parameters()]
        """Every parameter's requires_grad as the caller set it; `close()` restores them."""
        self.model_params = select_trainable(model, trainable or default_trainable(model, layer))
        self.params: dict[str, Tensor] = {}
        """What the optimizer trains: the model's own tensor if fp32, else an fp32 master copy."""
        self._hooks: list[RemovableHandle] = []
        for name, param in self.model_params.items():
            if param.dtype == torch.float32:
                self.params[name] = param
            else:
                self.params[name] = param.detach().float().requires_grad_()
                self._hooks.append(param.register_post_accumulate_grad_hook(self._route_grad(self.params[name])))
        self.constraints: list = []
        """Applied to each optimizer step's update in `step_done` (see `constraints.py`)."""
        self.capturable = True
        """False once a CUDA graph capture of a step on this model failed: later edits run eagerly (`graphs.py`)."""
        self._previous: dict[str, Tensor] = {}
        self._editing, self._closed = False, False
        self._prefix = self._prefix_cache() if prefix_cache else None
        self.start = self._prefix.start if self._prefix is not None else None
        """The lowest decoder layer holding a trained tensor; None: the prefix cache is off."""

    def __enter__(self) -> "Policy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _route_grad(self, master: Tensor) -> Callable[[Tensor], None]:
        """A post-accumulate-grad hook moving a low-precision parameter's gradient into its fp32
        master, while this Policy is editing (another Policy on the same model may be)."""

        def hook(param: Tensor) -> None:
            if self._editing:
                grad = param.grad.float()
                master.grad = grad if master.grad is None else master.grad + grad
                param.grad = None

        return hook

    def _prefix_cache(self) -> PrefixCache | None:
        """A prefix cache from the lowest decoder layer holding a trained tensor; None if no layer is
        below it or a trained tensor lies outside the decoder layers."""
        try:
            list_name, layers = find_layers(self.model)
        except ValueError:
            return None
        found = [re.fullmatch(rf"{re.escape(list_name)}\.(\d+)\.(.+)", name) for name in self.params]
        if not all(found):
            return None
        start = min(int(m.group(1)) for m in found)
        if start == 0:
            return None
        owners = {m.group(2).rpartition(".")[0] for m in found if int(m.group(1)) == start}
        owner = layers[start].get_submodule(owners.pop()) if len(owners) == 1 else None
        return PrefixCache(self.model, list(layers), start, owner)

    def begin_edit(self, sequences: Sequence[Tensor] = ()) -> None:
        """Start an edit: bring the fp32 masters to the model's current tensors (on their device),
        route gradients into them, forget cached prefixes, and show the constraints the edit's `sequences`
        ((1, T) ids each: c+y_w, then its replays'; `constraints.KeySpan` reads their keys)."""
        if self._closed:
            raise RuntimeError("this Policy is closed; make a new one to edit the model again")
        frozen = [name for name, param in self.model_params.items() if not param.requires_grad]
        if frozen:
            raise RuntimeError(f"{frozen} no longer require grad: another Policy on this model changed the flags; "
                               "close it before editing with this one")
        self.sync_masters()
        self._editing = True
        if self._prefix is not None:
            self._prefix.clear()
        if self.constraints:
            for constraint in self.constraints:
                constraint.begin_edit(sequences)
            self._previous = self.original_values()

    def end_edit(self) -> None:
        """End the edit: gradients stop routing, cached prefixes and the last step's gradients are freed."""
        self._editing = False
        if self._prefix is not None:
            self._prefix.clear()
        for value in self.params.values():
            value.grad = None

    def close(self) -> None:
        """Give the model back as it came: gradient hooks removed, every `requires_grad` flag as it
        was. The edits stay in its weights. A second call does nothing."""
        self.end_edit()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._flags.clear()
        self._closed = True

    def sync_masters(self) -> None:
        """Bring each fp32 master to its model tensor: where the model no longer holds the master's
        rounding, something outside the Policy wrote it (`apply_edit`, another editor) and the
        model's value is taken; elsewhere the master keeps its extra precision."""
        with torch.no_grad():
            for name, value in self.params.items():
                param = self.model_params[name]
                if value is param:
                    continue
                if value.device != param.device:  # Lightning may have moved the model
                    value.data = value.data.to(param.device)
                value.copy_(torch.where(value.to(param.dtype) == param, value, param.float()))

    def step_done(self) -> None:
        """After an optimizer step: constrain the step's update, then round into the model."""
        if self.constraints:
            with torch.no_grad():
                for name, value in self.params.items():
                    for constraint in self.constraints:
                        constraint.apply(name, value, self._previous[name])
            self._previous = self.original_values()
        self.write_back()

    def write_back(self) -> None:
        """Round the fp32 masters into the model's tensors; call after every optimizer step."""
        with torch.no_grad():
            for name, value in self.params.items():
                if value is not self.model_params[name]:
                    self.model_params[name].copy_(value)

    def original_values(self) -> dict[str, Tensor]:
        """A copy of the trained tensors (fp32), to restore or swap in later. Outside an edit the
        masters are first brought to the model's tensors."""
        if not self._editing:
            self.sync_masters()
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load_values(self, values: dict[str, Tensor]) -> None:
        """Write `values` into the trained tensors in place (optimizer state stays attached)."""
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(value)
        self.write_back()

    def rows(self, input_ids: Tensor, n_target: int, attention_mask: Tensor | None = None,
             position_ids: Tensor | None = None) -> Tensor:
        """Log-softmax rows predicting the last `n_target` tokens: input (B, T) -> (B, n_target, V).
        A left-padded batch also gives its attention_mask and position_ids (`generation.left_pad`).
        Within an edit, the input's fixed part is computed once and replayed."""
        padding = {name: t for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids))
                   if t is not None}
        if self._prefix is None or not self._editing:
            return target_rows(self.model, n_target, input_ids=input_ids, **padding)
        with self._prefix.replay(input_ids, **padding):
            return target_rows(self.model, n_target, input_ids=input_ids, **padding)
