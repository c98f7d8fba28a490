"""CUDA graphs for an edit's steps (`EditConfig.cuda_graphs`; GPU only, CPU runs the eager loop).

On a GPU an edit's step over a dozen tokens is bound by launching kernels from Python, not by the GPU:
at the LLaMA-3-8B shape it ran 11x above its memory-bandwidth floor. Within one edit every step has
the same shapes and reads the same tensors (c+y_w, its cached prefix, the reference rows); only y_l
changes, once per cycle, and it is copied into a fixed buffer. So the edit's second step is captured
once (forward from the trained tensor up, head, loss, backward, Adam, write-back into the model) and
replayed for every later step, and the cycle-end forward that regenerates y_l likewise. The first
step runs eagerly, the warm-up a capture needs (Adam's state is made there, not inside the graph). The
host waits once per cycle, for the early-stop test.

What a captured step does is fixed at capture: Lightning's per-backward and per-optimizer-step hooks
run once, at the capture, not at every replay.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

Capture = Callable[[Callable[[], None], Any], tuple[Callable[[], None], Any]]
"""capture(fn, pool) -> (replay, pool): record `fn` without running it; `replay()` runs what it recorded."""


def cuda_capture(fn: Callable[[], None], pool: Any = None) -> tuple[Callable[[], None], Any]:
    """Record `fn`'s kernels in a CUDA graph (nothing runs now), sharing memory `pool` if given."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            fn()
    except Exception:
        graph.reset()  # give back the memory the failed capture took
        raise
    return graph.replay, graph.pool()


CAPTURES: dict[str, Capture] = {"cuda": cuda_capture}
"""How a step is captured on each device type; a device not named here runs its steps eagerly."""


def graphs_apply(config, batch, policy, optimizer) -> bool:
    """Whether an edit's steps can run as graphs: asked for, every trained tensor on a device of `CAPTURES`,
    one row (no replays) of kdpo or ftm (vanilla DPO makes a new input each cycle), no update constraints
    (the norm bound tests its norm on the host), an Adam (whose step count can stay on the device)."""
    devices = {p.device.type for p in policy.params.values()}
    return (config.cuda_graphs and policy.capturable and len(devices) == 1 and devices <= CAPTURES.keys()
            and len(batch) == 1 and config.method in ("kdpo", "ftm") and not policy.constraints
            and isinstance(_inner(optimizer), torch.optim.Adam))


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind Lightning's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class GraphedSteps:
    """One edit's steps and y_l forwards, each captured at its first use and replayed after.

    `step_fn(y_l)` makes one optimizer step and returns its loss (detached); `rows_fn()` returns the rows
    on c+y_w. Both read only tensors that live as long as the edit. If a capture fails (an op a graph
    cannot hold), the rest of the edit runs eagerly, with a warning."""

    def __init__(self, step_fn: Callable[[Tensor], Tensor], rows_fn: Callable[[], Tensor], optimizer: Any) -> None:
        self._step_fn, self._rows_fn = step_fn, rows_fn
        groups = _inner(optimizer).param_groups
        device = groups[0]["params"][0].device.type
        self._capture = CAPTURES[device]
        if device == "cuda":
            for group in groups:
                group["capturable"] = True  # Adam's step count stays on the device: a step never reads the host
        self._graphs: dict[str, Callable[[], None]] = {}
        """Replays by output name ("loss", "rows"), each recorded at its first call."""
        self._pool: Any = None
        self._out: dict[str, Tensor] = {}
        self._y_l: Tensor | None = None
        self.eager = False
        """True once a capture failed: the rest of the edit runs eagerly."""

    @property
    def graphed(self) -> bool:
        """Whether every step after the first was replayed (a step graph exists and no capture failed)."""
        return "loss" in self._graphs and not self.eager

    def step(self, y_l: Tensor) -> Tensor:
        """One optimizer step with this cycle's y_l."""
        self._y_l = y_l.clone() if self._y_l is None else self._y_l.copy_(y_l)
        return self._run("loss", lambda: self._step_fn(self._y_l)).clone()

    def rows(self) -> Tensor:
        """The rows on c+y_w (no grad), to regenerate y_l after a cycle's steps."""
        return self._run("rows", self._no_grad_rows)

    def _run(self, name: str, fn: Callable[[], Tensor]) -> Tensor:
        """`fn()`, replayed from its graph (recorded at the first call), or eagerly once a capture failed."""
        if name not in self._graphs and not self.eager:
            replay = self._record(lambda: self._out.update({name: fn()}))
            if replay is not None:
                self._graphs[name] = replay
        if self.eager:
            return fn()
        self._graphs[name]()
        return self._out[name]

    def _no_grad_rows(self) -> Tensor:
        with torch.no_grad():
            return self._rows_fn()

    def _record(self, fn: Callable[[], None]) -> Callable[[], None] | None:
        try:
            replay, self._pool = self._capture(fn, self._pool)
        except Exception as err:  # noqa: BLE001 - whatever stops a capture, the edit goes on eagerly
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); the edit goes on without graphs, "
                          "but random draws on this GPU may fail from now on in this process (torch leaves its "
                          "generator marked as capturing). Set edit.cuda_graphs false to skip the attempt.",
                          stacklevel=4)
            self.eager = True
            return None
        return replay
