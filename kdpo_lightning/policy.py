"""The model under edit: which tensors train, and forwards that return only target-position rows.

Architecture discovery: the decoder layers are the ModuleList of `num_hidden_layers` blocks; in a
layer, the MLP's output projection is the weight outside attention that maps a wider size back to
the hidden size (down_proj, c_proj, fc_out, dense_4h_to_h, fc2, ...). No per-family table.

Precision: in a bf16/fp16 model an Adam step of lr 1e-4 is below the resolution of most entries
of the trained tensor and rounds away. So the optimizer trains an fp32 master copy; gradients are
routed into it, and after each step it is rounded into the model's own tensor for the forward.

Prefix caching: only one layer's tensors train, so the layers below it give the same output for
the whole edit. That output is captured once per input; later forwards replay it in place of the
lower layers, while everything outside the layers (embeddings, position and mask computation,
the upper layers, the head) runs as usual. Exact, because the same modules see the same inputs.
"""
from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
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


def target_rows(model: nn.Module, n_target: int, **inputs: Tensor) -> Tensor:
    """Log-softmax rows predicting the last `n_target` tokens: (B, n_target, V), fp32.

    Only the last n_target + 1 positions go through the LM head (the row at t predicts t+1)."""
    logits = model(**inputs, logits_to_keep=n_target + 1, use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1)


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


def _route_grad(master: Tensor) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook moving a low-precision parameter's gradient into its fp32 master."""

    def hook(param: Tensor) -> None:
        if param.grad is None:  # already taken by the hook of an earlier Policy on the same model
            return
        grad = param.grad.float()
        master.grad = grad if master.grad is None else master.grad + grad
        param.grad = None

    return hook


class Policy:
    """The model being edited, its trained tensors (fp32), and target-row forwards with a prefix cache."""

    def __init__(self, model: nn.Module, trainable: str | list[str] | None = None, layer: int | None = None,
                 prefix_cache: bool = True) -> None:
        self.model = model
        self.model_params = select_trainable(model, trainable or default_trainable(model, layer))
        self.params: dict[str, Tensor] = {}
        """What the optimizer trains: the model's own tensor if fp32, else an fp32 master copy."""
        for name, param in self.model_params.items():
            if param.dtype == torch.float32:
                self.params[name] = param
            else:
                self.params[name] = param.detach().float().requires_grad_()
                param.register_post_accumulate_grad_hook(_route_grad(self.params[name]))
        self.constraints: list = []
        """Applied to each optimizer step's update in `step_done` (see `constraints.py`)."""
        self._previous: dict[str, Tensor] = {}
        self.start, self._lower = self._fixed_layers() if prefix_cache else (None, [])
        """The prefix cache replays the layers `_lower` (0..start-1); start None: it is off."""
        self._prefixes = PerInput()

    def _fixed_layers(self) -> tuple[int | None, list[nn.Module]]:
        """The lowest decoder layer holding a trained tensor and the layers below it, which stay
        fixed during an edit; (None, []) if there are none."""
        try:
            list_name, layers = find_layers(self.model)
        except ValueError:
            return None, []
        pattern = re.compile(rf"{re.escape(list_name)}\.(\d+)\.")
        found = [pattern.match(name) for name in self.params]
        if not all(found):  # a trained tensor outside the decoder layers: nothing below it is fixed
            return None, []
        start = min(int(m.group(1)) for m in found)
        return (start, list(layers)[:start]) if start else (None, [])

    def begin_edit(self) -> None:
        """Forget cached prefixes (valid only while the layers below stay as they are), and keep
        the fp32 masters on their model tensor's device (Lightning may have moved the model)."""
        self._prefixes.clear()
        for name, value in self.params.items():
            param = self.model_params[name]
            if value is not param and value.device != param.device:
                value.data = value.data.to(param.device)
        if self.constraints:
            self._previous = self.original_values()

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
        """A copy of the trained tensors (fp32), to restore or swap in later."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load_values(self, values: dict[str, Tensor]) -> None:
        """Write `values` into the trained tensors in place (optimizer state stays attached)."""
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(value)
        self.write_back()

    def rows(self, input_ids: Tensor, n_target: int) -> Tensor:
        """Log-softmax rows predicting the last `n_target` tokens: input (B, T) -> (B, n_target, V)."""
        if self.start is None:
            return target_rows(self.model, n_target, input_ids=input_ids)
        with self._replay(self._prefixes.get(input_ids, lambda: self._capture(input_ids))):
            return target_rows(self.model, n_target, input_ids=input_ids)

    def _capture(self, input_ids: Tensor) -> Any:
        """The output of layer `start - 1` on this input: one no-grad forward, stopped there."""
        captured = []

        def capture(module, args, output):
            captured.append(output)
            raise _StopForward

        handle = self._lower[-1].register_forward_hook(capture)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextmanager
    def _replay(self, output: Any) -> Iterator[None]:
        """Make layers 0..start-1 return `output` without computing. Each layer keeps its place
        and attributes (e.g. its attention type), so the model's own loop, masks and position
        handling run unchanged; an instance-level `forward` another library set is restored."""
        saved = [layer.__dict__.get("forward") for layer in self._lower]
        for layer in self._lower:
            layer.forward = lambda *args, **kwargs: output
        try:
            yield
        finally:
            for layer, forward in zip(self._lower, saved):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
