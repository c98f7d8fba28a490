"""Edit quality of KDPO vs vanilla DPO vs FT-M on SmolLM2-135M, with the paper's protocol.

Each run is `kdpo-lightning fit --config configs/demo.yaml` with overrides: sequential edits,
evaluated after all of them, same-subject filter, 10 cycles x 8 Adam steps, lr 1e-4, beta 0.1,
layer 20 of 30 trained, fluency from EasyEdit's top-5 sampling (seeded). Results land in bench/results/quality_<dataset>_<method>.json; the
table is printed as markdown (pasted into bench/README.md).

    python bench/quality.py                      # every dataset and method (hours on 2 CPU cores)
    python bench/quality.py --datasets zsre wikirecent --methods kdpo ftm
    python bench/quality.py --table              # only print the table from existing results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"

DATASETS = {  # name: (file, N)
    "zsre": ("ZsRE/ZsRE-test-all.json", 100),
    "wikirecent": ("wiki_recent/recent_train.json", 100),
    "counterfact": ("wiki_counterfact/train_cf.json", 50),
    "wikibio": ("WikiBio/wikibio-test-all.json", 50),
}
METHODS = ("kdpo", "dpo", "ftm")

# Paper Table 5, Qwen1.5-0.5B, 100 sequential edits: (Edit Succ., Portability, Locality, Fluency).
PAPER_QWEN_05B = {
    "zsre": {"ftm": (77.8, 35.9, 30.0, 4.4), "dpo": (77.4, 43.2, 32.1, 4.4), "kdpo": (85.3, 43.0, 34.9, 4.4)},
    "counterfact": {"ftm": (63.1, 23.9, 35.1, 4.4), "dpo": (69.2, 26.2, 40.1, 3.6), "kdpo": (73.3, 26.8, 39.1, 3.6)},
    "wikirecent": {"ftm": (76.1, 35.6, 59.1, 4.9), "dpo": (79.9, 34.4, 50.3, 4.6), "kdpo": (83.5, 34.4, 52.4, 4.9)},
}


def result_path(dataset: str, method: str) -> Path:
    return RESULTS / f"quality_{dataset}_{method}.json"


def run(dataset: str, method: str, extra: list[str]) -> None:
    """One sequential-edit experiment through the CLI (a fresh process: no state shared between runs)."""
    file, n = DATASETS[dataset]
    cmd = [sys.executable, "-m", "kdpo_lightning.cli", "fit", "--config", str(ROOT / "configs/demo.yaml"),
           "--model.method", method,
           "--data.path", str(DATA / file), "--data.n_edits", str(n),
           "--trainer.default_root_dir", str(ROOT / "runs" / f"quality_{dataset}_{method}"),
           "--checkpoint.every_n_edits", "10", "--model.fluency_sampling", "top_k",
           "--model.results_path", str(result_path(dataset, method)), *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def table() -> str:
    """Markdown table of every result present, with the paper's Qwen1.5-0.5B numbers beside it."""
    head = ("| dataset | method | N | Edit Succ. | Rephrase | Portability | Locality | Fluency | cycles/edit "
            "| steps/edit | s/edit | paper Qwen1.5-0.5B (Edit/Port/Loc/Flu) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for dataset in DATASETS:
        for method in METHODS:
            path = result_path(dataset, method)
            if not path.exists():
                continue
            res = json.loads(path.read_text())
            s, reqs = res["summary"], res["requests"]
            mean = lambda key: sum(r[key] for r in reqs) / len(reqs)  # noqa: E731
            paper = PAPER_QWEN_05B.get(dataset, {}).get(method)
            lines.append(
                f"| {dataset} | {method} | {res['n_edits']} | {_fmt(s.get('edit_success'))} | {_fmt(s.get('rephrase'))} "
                f"| {_fmt(s.get('portability'))} | {_fmt(s.get('locality'))} | {s.get('fluency', 0):.2f} "
                f"| {mean('cycles'):.2f} | {mean('steps'):.1f} | {mean('seconds'):.1f} "
                f"| {'/'.join(_fmt(v) for v in paper) if paper else '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--table", action="store_true", help="only print the table of existing results")
    parser.add_argument("--skip-existing", action="store_true", help="do not rerun a result that exists")
    args, extra = parser.parse_known_args()
    if not args.table:
        for dataset in args.datasets:
            for method in args.methods:
                if not (args.skip_existing and result_path(dataset, method).exists()):
                    run(dataset, method, extra)
    print(table())


if __name__ == "__main__":
    main()
