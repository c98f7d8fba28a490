"""Edit quality after N sequential edits on SmolLM2-135M: datasets x methods x disjoint seeded subsets,
with 95% bootstrap confidence intervals. Resumable: finished runs are kept, a stopped one resumes
from its checkpoint, so a long matrix spans several sittings.

Each run is `kdpo-lightning fit --config configs/demo.yaml` with the paper's protocol (sequential
edits evaluated after all of them, same-subject filter, 10 cycles x 8 Adam steps, lr 1e-4, beta 0.1,
layer 20 of 30), greedy fluency, generated-answer metrics and Edit Succ. right after each edit.

Subsets: the filtered requests of a dataset are shuffled with seed 0; the first TUNE form the tuning
slice (variants are screened there and it is never reported), then come disjoint subsets of N.

    python bench/quality.py --jobs 2                          # the report matrix, 2 runs at once (hours)
    python bench/quality.py --datasets zsre --methods kdpo ftm --subsets 0
    python bench/quality.py --tune --methods kdpo kdpo_null   # screen on the tuning slice
    python bench/quality.py --table                           # only the table of what exists
    python bench/quality.py --jobs 15 --threads 1 --trainer.accelerator gpu   # the CLI's flags go to every run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "quality"
RUNS = ROOT / "runs" / "quality"
TUNE = 50
DATASETS = {  # name: (data set name, N per subset, number of subsets)
    "zsre": ("knowedit/zsre", 100, 3),
    "wikirecent": ("knowedit/wiki_recent", 100, 3),
    "counterfact": ("knowedit/wiki_counterfact", 50, 1),
    "wikibio": ("knowedit/wikibio", 50, 1),
}
CHAT = ["--model.edit.chat_template", "true", "--model.edit.train_stop", "true"]  # edits as chat turns, then stop
METHODS = {  # name: overrides of configs/demo.yaml
    "ftm": ["--model.edit.method", "ftm"],
    "kdpo": [],
    "kdpo_null": ["--model.constraints.nullspace_threshold", "0.01"],
    "kdpo_null10": ["--model.constraints.nullspace_threshold", "0.1"],
    "kdpo_nll": ["--model.edit.nll_alpha", "0.5"],
    "kdpo_nll01": ["--model.edit.nll_alpha", "0.1"],
    "kdpo_norm": ["--model.constraints.max_change", "0.05"],
    "kdpo_norm10": ["--model.constraints.max_change", "0.1"],
    "kdpo_nll_norm10": ["--model.edit.nll_alpha", "0.5", "--model.constraints.max_change", "0.1"],
    "kdpo_chat": CHAT,
    "ftm_chat": ["--model.edit.method", "ftm", *CHAT],
    "kdpo_null_nll": ["--model.constraints.nullspace_threshold", "0.1", "--model.edit.nll_alpha", "0.5"],
    # MEMIT/AlphaEdit: the official LLaMA3-8B settings, but v_lr 0.5 (the official GPT-J/GPT-2-XL value; at 0.1 the
    # target value does not converge on SmolLM2: 0/5 edits) and, for AlphaEdit, 50 steps (5/5); MEMIT's lambda 1500
    # (at the official 15000 each layer writes a third of its residual on SmolLM2's keys: 0/5; 1500: 3/5).
    "memit": ["--model.edit.method", "memit", "--model.locate.v_lr", "0.5", "--model.locate.mom2_update_weight", "1500"],
    "alphaedit": ["--model.edit.method", "alphaedit", "--model.locate.v_lr", "0.5",
                  "--model.locate.v_num_grad_steps", "50"],
}
METRICS = ("edit_success", "edit_success_right_after", "gen_edit_success_em", "gen_edit_success_contains",
           "rephrase", "portability_mean", "locality_mean", "gen_locality")


def filtered_shuffle(name: str) -> list[dict]:
    """The raw records of data set `name` after the paper's same-subject filter, shuffled with seed 0: the
    order every subset and ordering of the benches is cut from (bench/lifelong.py too)."""
    sys.path.insert(0, str(ROOT))
    from kdpo_lightning.sources import find_data

    records = json.loads(find_data(name).read_text(encoding="utf-8-sig"))
    seen, kept = set(), []
    for record in records:
        subject = str(record.get("subject", record.get("concept", ""))).strip()
        if subject not in seen:
            kept.append(record)
        seen.add(subject)
    random.Random(0).shuffle(kept)
    return kept


def subsets(dataset: str) -> dict[str, list[dict]]:
    """{"tune": TUNE records, "0": N records, ...}: disjoint, from the same-subject-filtered file."""
    name, n, count = DATASETS[dataset]
    kept = filtered_shuffle(name)
    parts = {"tune": kept[:TUNE]}
    for k in range(count):
        parts[str(k)] = kept[TUNE + k * n : TUNE + (k + 1) * n]
    return parts


def run(dataset: str, subset: str, method: str, n: int, threads: int, forwarded: list[str]) -> str | None:
    """One sequential-edit run with `threads` CPU threads, resumed from its checkpoint if it was stopped,
    skipped if its results exist. Returns None, or what went wrong."""
    result = OUT / f"{dataset}_{subset}_{method}.json"
    if result.exists():
        return None
    data = OUT / "subsets" / f"{dataset}_{subset}.json"
    run_dir = RUNS / f"{dataset}_{subset}_{method}"
    args = ["--data.path", cli_path(data), "--data.n_edits", str(n), "--evaluation.generation", "true",
            "--retention.every_n_edits", str(n), *METHODS[method], *forwarded]
    return fit(f"{dataset}_{subset}_{method}", args, run_dir, result, threads)


def cli_path(path: Path) -> str:
    """A path for the CLI, whose results record paths as given: relative to the repo root when under it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fit(name: str, args: list[str], run_dir: Path, result: Path, threads: int,
        checkpoints: Path | None = None) -> str | None:
    """`kdpo-lightning fit` on configs/demo.yaml plus `args`, in its own process, its output in
    run_dir/output.log, checkpoints every 10 edits (in `checkpoints`, default run_dir/checkpoints) and resumed
    from the last. Returns None, or what went wrong."""
    checkpoints = checkpoints or run_dir / "checkpoints"
    cmd = [sys.executable, "-m", "kdpo_lightning.cli", "fit", "--config", "configs/demo.yaml", *args,
           "--trainer.default_root_dir", cli_path(run_dir), "--checkpoint.dirpath", cli_path(checkpoints),
           "--checkpoint.every_n_edits", "10", "--results.path", cli_path(result)]
    if (checkpoints / "last.ckpt").exists():
        cmd += ["--ckpt_path", "last"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "output.log"
    print(f"{name}: started ({log})\n  {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    with log.open("a") as stream:
        code = subprocess.run(cmd, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if code or not result.exists():  # a run stopped by SIGTERM ends with status 0 and no results
        tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-5:])
        print(f"{name}: FAILED with exit status {code}, results {'written' if result.exists() else 'missing'}; "
              f"the end of {log}:\n    {tail}", flush=True)
        return f"{name} (exit status {code}, {log})"
    print(f"{name}: done in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return None


def bootstrap(per_subset: list[list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean x100 and a 95% percentile interval, resampling subsets, then requests within each."""
    rng = random.Random(seed)
    values = [v for s in per_subset for v in s]
    means = []
    for _ in range(reps):
        sample = []
        for s in (rng.choice(per_subset) for _ in per_subset):
            sample += rng.choices(s, k=len(s))
        means.append(sum(sample) / len(sample))
    means.sort()
    return 100 * sum(values) / len(values), 100 * means[int(0.025 * reps)], 100 * means[int(0.975 * reps) - 1]


def table(tune: bool = False, only: list[str] | None = None) -> str:
    """One row per dataset and method, then the pre-edit model's row: each metric's mean and 95% interval over
    the subsets' requests (all report subsets, or `only` these). The pre-edit row has the generated metrics
    (`pre_<metric>` in every run, the same for every method) and leaves the others empty."""
    head = "| dataset | method | subsets x N | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for dataset in DATASETS:
        before = {}  # subset: one run's results, for its pre-edit values
        for method in METHODS:
            found = {s: r for s in _subset_names(dataset, tune, only) if (r := _results(dataset, s, method))}
            if found:
                lines.append(_row(dataset, method, list(found.values()), METRICS))
                before = {**found, **before}
        if before:
            lines.append(_row(dataset, "pre-edit", list(before.values()), [f"pre_{m}" for m in METRICS]))
    return "\n".join(lines)


def _row(dataset: str, method: str, results: list[dict], keys: list[str]) -> str:
    cells = []
    for key in keys:
        per_subset = [[r[key] for r in res["requests"] if r.get(key) is not None] for res in results]
        per_subset = [s for s in per_subset if s]
        if per_subset:
            mean, low, high = bootstrap(per_subset)
            cells.append(f"{mean:.1f} [{low:.1f}, {high:.1f}]")
        else:
            cells.append("–")
    n = f"{len(results)} x {len(results[0]['requests'])}"
    return f"| {dataset} | {method} | {n} | " + " | ".join(cells) + " |"


def _results(dataset: str, subset: str, method: str) -> dict | None:
    path = OUT / f"{dataset}_{subset}_{method}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _subset_names(dataset: str, tune: bool, only: list[str] | None = None) -> list[str]:
    return ["tune"] if tune else [str(k) for k in range(DATASETS[dataset][2]) if only is None or str(k) in only]


def paired(dataset: str, a: str, b: str, metric: str, tune: bool = False,
           only: list[str] | None = None) -> tuple[float, float, float] | None:
    """Mean and 95% interval of `a - b` in `metric` (points), paired by request over the subsets both ran
    (of `only`, if given)."""
    per_subset = []
    for subset in _subset_names(dataset, tune, only):
        ra, rb = _results(dataset, subset, a), _results(dataset, subset, b)
        if ra and rb:
            other = {r["index"]: r.get(metric) for r in rb["requests"]}
            per_subset.append([r[metric] - other[r["index"]] for r in ra["requests"]
                               if r.get(metric) is not None and other.get(r["index"]) is not None])
    return bootstrap(per_subset) if per_subset else None


def verdict(best: str, baselines: tuple[str, ...] = ("ftm", "kdpo"), tune: bool = False,
            only: list[str] | None = None) -> str:
    """Per dataset: does `best` beat every baseline in Edit Succ. (paired interval above 0) with Locality
    no worse than the best-keeping baseline's (paired interval reaching 0)? Over the subsets `only`, if given."""
    fmt = "{:+.1f} [{:+.1f}, {:+.1f}]".format
    lines = ["| dataset | " + " | ".join(f"{best} - {b}: Edit Succ." for b in baselines)
             + " | better locality | Locality difference | beats all, locality kept |",
             "|---|" + "---|" * (len(baselines) + 3)]
    for dataset in DATASETS:
        edit = [paired(dataset, best, b, "edit_success", tune, only) for b in baselines]
        local = {b: paired(dataset, best, b, "locality_mean", tune, only) for b in baselines}
        if None in edit or None in local.values():
            continue
        keeper = min(baselines, key=lambda b: local[b][0])  # the baseline whose locality is higher
        answer = all(low > 0 for _, low, _ in edit) and local[keeper][2] >= 0
        lines.append(f"| {dataset} | " + " | ".join(fmt(*e) for e in edit)
                     + f" | {keeper} | {fmt(*local[keeper])} | {'yes' if answer else 'no'} |")
    return "\n".join(lines)


def _order(job: tuple) -> tuple:
    dataset, subset, method, _ = job
    return (subset, list(DATASETS).index(dataset), list(METHODS).index(method))


def main() -> None:
    global OUT, RUNS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=["ftm", "kdpo", "kdpo_nll"],
                        choices=list(METHODS))
    parser.add_argument("--subsets", nargs="+", help="report subsets to run and tabulate (default: all of each "
                        "dataset)")
    parser.add_argument("--n", type=int, help="edits per subset: its first n (default: the dataset's N; for "
                        "smoke tests)")
    parser.add_argument("--tune", action="store_true", help="run the tuning slice instead of the report subsets")
    parser.add_argument("--best", default="kdpo_nll", choices=list(METHODS),
                        help="the method compared with the baselines, paired by request")
    parser.add_argument("--baselines", nargs="+", default=["ftm", "kdpo"], choices=list(METHODS),
                        help="what --best is compared with (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, sharing the CPU cores")
    parser.add_argument("--threads", type=int, help="CPU threads of each run (default: the cores / jobs)")
    parser.add_argument("--table", action="store_true", help="only print the table of existing results")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the run results (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="run folders, with checkpoints and output.log")
    parser.add_argument("--name", default="quality", help="name of the table's JSON under bench/results")
    args, forwarded = parser.parse_known_args()  # the CLI's own flags (--trainer.accelerator gpu, ...) go to every run
    unknown = [a for a in forwarded if a.startswith("--") and "." not in a]
    if unknown:
        parser.error(f"unknown flags {unknown}")
    OUT, RUNS = args.out.resolve(), args.runs.resolve()
    started, failed = report.now(), []
    if not args.table:
        jobs = []  # subset-major: the first subset of every dataset before the second of any
        for dataset in args.datasets:
            for subset, records in subsets(dataset).items():
                if (subset == "tune") == args.tune and (args.tune or not args.subsets or subset in args.subsets):
                    records = records[:args.n]
                    path = OUT / "subsets" / f"{dataset}_{subset}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(records, ensure_ascii=False))
                    jobs += [(dataset, subset, method, len(records)) for method in args.methods]
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [f for f in pool.map(lambda job: run(*job, threads, forwarded), sorted(jobs, key=_order)) if f]
    result = table(args.tune, args.subsets) + "\n\n" + verdict(args.best, tuple(args.baselines), args.tune,
                                                                args.subsets)
    report.save(f"{args.name}_tune" if args.tune else args.name, result, started)
    if failed:
        sys.exit("failed runs (the others finished): " + "; ".join(failed))


if __name__ == "__main__":
    main()
