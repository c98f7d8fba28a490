"""Where the time of one variant-(c) edit goes, and two prototype changes to kdpo_lightning, timed.

  PYTHONPATH=. python bench/profile_edit.py            # same model and edits as bench/edit_speed.py

Prints a torch.profiler table of one edit (cached reference + prefix cache), the time per region,
then times, on the same edits, the package as it is against:
  trim   feed c+y_w without its last token: that token only feeds the row that predicts past the
         end, which the loss drops; the n rows for y_w come out of T-1 positions, head on n rows
         (policy.target_rows with logits_to_keep=n and no [:-1], Policy.rows on input_ids[:, :-1])
  fused  torch.optim.Adam(fused=True) (the optimizer made per edit by KDPOEditor and its callers)
Both leave the losses unchanged; the script checks that.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import edit_speed as es
import kdpo_lightning.policy as policy_module
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.policy import PerInput, Policy
from kdpo_lightning.reference import make_reference

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--shape", default="llama-130m", choices=list(es.SHAPES))
parser.add_argument("--n_edits", type=int, default=3)
parser.add_argument("--n_cycles", type=int, default=4)
parser.add_argument("--n_steps", type=int, default=8)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=2, help="timing rounds, interleaved; the best round counts")
parser.add_argument("--data", type=Path, default=es.DATA / "ZsRE" / "ZsRE-test-all.json")


def trimmed_target_rows(model, n_target: int, **inputs: torch.Tensor) -> torch.Tensor:
    """The n rows predicting the target when the input already lacks its last token."""
    return model(**inputs, logits_to_keep=n_target, use_cache=False).logits.float().log_softmax(-1)


class TrimmedPolicy(Policy):
    """Policy that never runs the last token of c+y_w. The caches are keyed on the input tensor
    object, so each input's trimmed view is made once per edit."""

    def begin_edit(self) -> None:
        super().begin_edit()
        self._trimmed = PerInput()

    def rows(self, input_ids: torch.Tensor, n_target: int) -> torch.Tensor:
        return super().rows(self._trimmed.get(input_ids, lambda: input_ids[:, :-1]), n_target)


def edit_all(model, layer: int, edits: list[dict], cfg: EditConfig, trim: bool, fused: bool) -> tuple[float, list]:
    """Apply the edits in order from the model's current weights, restore them; (seconds, losses)."""
    original = policy_module.target_rows
    policy_module.target_rows = trimmed_target_rows if trim else original
    try:
        policy = (TrimmedPolicy if trim else Policy)(model, layer=layer, prefix_cache=True)
        before = policy.original_values()
        start, losses = time.perf_counter(), []
        for e in edits:
            optimizer = torch.optim.Adam(policy.params.values(), lr=cfg.lr, fused=fused)
            ids = torch.tensor([e["input_ids"]])
            losses += run_edit(policy, make_reference("cached"), ids, e["target_start"], cfg, optimizer).losses
        seconds = time.perf_counter() - start
        policy.load_values(before)
    finally:
        policy_module.target_rows = original
    return seconds, losses


def profile_regions(model, layer: int, e: dict, cfg: EditConfig) -> None:
    """torch.profiler over one edit, with the package's forwards and the backward marked as regions."""
    regions = {"prefix (layers below the edited one)": (Policy, "_prefix"),
               "forward from the edited layer + head": (policy_module, "target_rows")}
    originals = {name: getattr(owner, attr) for name, (owner, attr) in regions.items()}

    def marked(name, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    for name, (owner, attr) in regions.items():
        setattr(owner, attr, marked(name, originals[name]))
    try:
        policy = Policy(model, layer=layer, prefix_cache=True)
        before = policy.original_values()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("edit"):
                optimizer = torch.optim.Adam(policy.params.values(), lr=cfg.lr)
                run_edit(policy, make_reference("cached"), torch.tensor([e["input_ids"]]), e["target_start"], cfg,
                         optimizer, backward=marked("backward", torch.Tensor.backward))
        policy.load_values(before)
    finally:
        for name, (owner, attr) in regions.items():
            setattr(owner, attr, originals[name])
    events = {ev.key: ev for ev in prof.key_averages()}
    total = events["edit"].cpu_time_total
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"one edit, {cfg.n_cycles * cfg.n_steps} steps: {total / 1e3:.0f} ms (profiled)")
    for name in [*regions, "backward", "Optimizer.step#Adam.step"]:
        if name in events:
            ev = events[name]
            print(f"  {name:<40} {ev.cpu_time_total / 1e3:8.1f} ms  {100 * ev.cpu_time_total / total:5.1f}%"
                  f"  ({ev.count} calls)")


def main() -> None:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EditConfig("kdpo", args.n_cycles, args.n_steps, 1e-4, 0.1, mask_where_equal=True, early_stop=False)
    layer = es.SHAPES[args.shape]["layer"]
    with tempfile.TemporaryDirectory() as tmp:
        workload = json.loads(es.make_workload(args.data, args.n_edits, Path(tmp)).read_text())
    model = es.build_model(args.shape, torch.device("cpu"), torch.float32)
    edit_all(model, layer, [workload["warmup"]], cfg, trim=False, fused=False)
    profile_regions(model, layer, workload["edits"][0], cfg)

    setups = {"package": (False, False), "trim": (True, False), "fused": (False, True), "trim+fused": (True, True)}
    best, losses = {name: float("inf") for name in setups}, {}
    for _ in range(args.repeats):
        for name, (trim, fused) in setups.items():
            seconds, losses[name] = edit_all(model, layer, workload["edits"], cfg, trim, fused)
            best[name] = min(best[name], seconds)
    steps = args.n_edits * args.n_cycles * args.n_steps
    print(f"\n{args.shape}, {args.n_edits} edits x {args.n_cycles * args.n_steps} steps, {args.threads} threads, "
          f"best of {args.repeats} interleaved rounds")
    for name, seconds in best.items():
        diff = max(abs(a - b) for a, b in zip(losses["package"], losses[name], strict=True))
        print(f"  {name:<11} {1e3 * seconds / args.n_edits:8.1f} ms/edit {1e3 * seconds / steps:7.2f} ms/step"
              f"  {best['package'] / seconds:5.2f}x  max |loss - package| {diff:.1e}")


if __name__ == "__main__":
    main()
