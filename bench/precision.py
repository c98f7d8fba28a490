"""Do edits on a bf16 model converge as in fp32? SmolLM2-135M, the first N ZsRE requests, layer 20,
the paper's settings (10 cycles x 8 Adam steps, lr 1e-4, beta 0.1), sequential edits.

    python bench/precision.py                        # fp32 and bf16, 5 requests (a few minutes on 2 cores)
    python bench/precision.py --dtypes bfloat16 float16 --n 10

Prints a markdown table and writes bench/results/precision_<device>.json.
"""
from __future__ import annotations

import argparse

import report
import torch

from kdpo_lightning.data import load_requests
from kdpo_lightning.models import load_model
from kdpo_lightning.module import KDPOEditor


def run(dtype: str, n: int, device: str, layer: int) -> dict:
    """Sequential KDPO edits of the first `n` ZsRE requests in `dtype`; per-edit records."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype, device=device)
    editor = KDPOEditor.from_model(model, tokenizer, layer=layer)
    records = []
    for request in load_requests("knowedit/zsre")[:n]:
        record = editor.edit(request)
        records.append({"prompt": request.prompt, "target": request.target_new, **record.as_dict()})
        print(f"{dtype}: {request.prompt!r} -> {request.target_new!r}: success={record.success} "
              f"cycles={record.cycles} last_loss={record.last_loss}", flush=True)
    return {"dtype": dtype, "succeeded": sum(r["success"] for r in records), "n": n,
            "steps": sum(r["steps"] for r in records), "seconds": sum(r["seconds"] for r in records),
            "records": records}


def table(runs: list[dict]) -> str:
    lines = ["| dtype | edits succeeded | Adam steps (all edits) | last loss per edit | s/edit |", "|---|---|---|---|---|"]
    for r in runs:
        losses = ", ".join(f"{x['last_loss']:.3f}" if x["last_loss"] is not None else "–" for x in r["records"])
        lines.append(f"| {r['dtype']} | {r['succeeded']} / {r['n']} | {r['steps']} | {losses} | "
                     f"{r['seconds'] / r['n']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = report.now()
    runs = [run(dtype, args.n, args.device, args.layer) for dtype in args.dtypes]
    report.save(f"precision_{args.device}", table(runs), started, threads=args.threads, torch=torch.__version__,
                layer=args.layer, runs=runs)


if __name__ == "__main__":
    main()
