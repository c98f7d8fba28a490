"""Single-edit mode throughput with 1 and 2 processes (Lightning DDP, gloo on CPU).

Each run is `kdpo-lightning fit --config configs/demo.yaml --model.edit_mode single` on SmolLM2-135M:
every request is edited from the original weights, evaluated right after, and rolled back. The
machine's cores are split evenly: with P processes each gets cores/P threads.

    python bench/single_mode.py                  # 20 requests, 1 and 2 processes (~6 min on 2 cores)
    python bench/single_mode.py --n 40 --devices 1 2 --accelerator gpu

Prints a markdown table and writes bench/results/single_mode_<accelerator>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parents[1]


def run(devices: int, n: int, accelerator: str, cores: int) -> dict:
    """One `fit` in single mode; wall time of the whole command and the summed edit times."""
    out = ROOT / "runs" / f"single_mode_{accelerator}_{devices}"
    cmd = [sys.executable, "-m", "kdpo_lightning.cli", "fit", "--config", str(ROOT / "configs/demo.yaml"),
           "--model.edit_mode", "single", "--evaluation.fluency", "false", "--data.n_edits", str(n),
           "--trainer.accelerator", accelerator, "--trainer.devices", str(devices),
           "--trainer.default_root_dir", str(out), "--results.path", str(out / "results.json")]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    threads = str(max(1, cores // devices))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads})
    wall = time.perf_counter() - start
    rows = json.loads((out / "results.json").read_text())["requests"]
    return {"devices": devices, "threads_per_process": int(threads), "n": len(rows), "wall_s": wall,
            "edits_per_s": len(rows) / wall, "edit_s_sum": sum(r["seconds"] for r in rows),
            "succeeded": sum(r["success"] for r in rows)}


def table(runs: list[dict]) -> str:
    lines = ["| processes | threads each | requests | wall s (load + snapshot + edits + eval) | edits/s | "
             "edit s summed over processes | edits succeeded |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['devices']} | {r['threads_per_process']} | {r['n']} | {r['wall_s']:.0f} | {r['edits_per_s']:.3f} "
              f"| {r['edit_s_sum']:.0f} | {r['succeeded']} |" for r in runs]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()
    started = report.now()
    runs = [run(d, args.n, args.accelerator, args.cores) for d in args.devices]
    report.save(f"single_mode_{args.accelerator}", table(runs), started, cores=args.cores, runs=runs)


if __name__ == "__main__":
    main()
