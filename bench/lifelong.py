"""Lifelong editing on SmolLM2-135M (issue 25): 500 sequential ZsRE edits on 2 seeded orderings, a curve
point every 50 edits, then a table with 95% bootstrap intervals, a paired verdict for the best variant
and one plot of every method's curve. Resumable: finished runs are kept, a stopped one resumes from
its checkpoint, so the matrix spans several sittings.

Each run is `kdpo-lightning fit --config configs/demo.yaml` (the paper's protocol: 10 cycles x 8 Adam
steps, lr 1e-4, beta 0.1, layer 20 of 30) with generated-answer metrics and, at each curve point, MMLU
and HellaSwag (200 questions each), in its own process with one CPU thread; its output goes to
`output.log` in its run folder. Points before the last are light (`retention.light_points`): answers
are generated to the edit prompts only and fluency is skipped, which halves a 500-edit run's
evaluation on a CPU; the last point scores everything.

Orderings: the same-subject-filtered ZsRE records shuffled with seed 0 (as bench/quality.py); `tune` is
the first 200 (variants are screened there; a superset of quality.py's tuning slice), `0` and `1` are
seeded samples (seeds 1 and 2) of 500 from the rest.

    python bench/lifelong.py --jobs 2                                  # FT-M, KDPO, AlphaEdit on orderings 0, 1
    python bench/lifelong.py --orderings tune --methods kdpo kdpo_replay3 kdpo_editnull   # screen, 200 edits
    python bench/lifelong.py --methods kdpo_replay3 --best kdpo_replay3                   # the best, and the verdict
    python bench/lifelong.py --table --best kdpo_replay3               # only the table, verdict and plot

Runs write bench/results/lifelong/<ordering>_<method>.json. A run's checkpoint (its trained tensor, records
and RNG: a few MB) is kept in bench/results/lifelong/checkpoints/ until it ends, so that committing it
carries an unfinished run into the next sitting; its log is in runs/lifelong/. The unedited model's answers
(half an hour for 500 requests) are generated once per ordering, into bench/results/lifelong/pre_edit/
(`evaluation.pre_edit_cache`): commit them too. The table,
the verdict and their numbers go to bench/results/lifelong.json (lifelong_tune.json for the tuning
ordering), the plot to bench/results/lifelong.png. The table is the state after the last edit (the last
curve point); Locality is the mean of the requests' `locality_mean`, as in bench/quality.py.

Flags this script does not know (`--model.name_or_path DIR`, ...) go to every run; they are not part of
a run's name, so give runs with other ones their own `--out` and `--runs`.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import report
import quality
from quality import bootstrap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Setup:
    """Which requests and how many: the benchmark, or the quick smoke test."""

    data: str  # a data set name (kdpo_lightning.sources)
    tune: int  # requests in the tuning ordering
    size: int  # requests in each report ordering
    every: int  # edits between curve points
    name: str  # what report.save calls the table


FULL = Setup("knowedit/zsre", tune=200, size=500, every=50, name="lifelong")
QUICK = Setup("demo/zsre", tune=10, size=6, every=3, name="lifelong_quick")
ORDERING_SEEDS = {"0": 1, "1": 2}  # report ordering: the seed of its sample

REPLAY3 = ["--model.edit.replay", "3"]
KEY_SPAN = ["--model.constraints.key_span", "true"]
EDIT_NULL = ["--model.constraints.nullspace_threshold", "0.01", "--model.constraints.nullspace_texts", "0"]
METHODS = {  # name: overrides of configs/demo.yaml; a new variant is one more line
    "ftm": ["--model.edit.method", "ftm"],
    "kdpo": [],
    "alphaedit": quality.METHODS["alphaedit"],  # the settings of the side-by-side report (see bench/quality.py)
    "kdpo_replay3": REPLAY3,
    "kdpo_replay8": ["--model.edit.replay", "8"],
    "kdpo_replay3_pool20": REPLAY3 + ["--model.edit.replay_pool", "20"],  # the 3 chosen among 20: forgotten first
    "kdpo_replay5_pool50": ["--model.edit.replay", "5", "--model.edit.replay_pool", "50"],
    "kdpo_editnull": EDIT_NULL,  # the null space of earlier edits' keys only, no generic text
    "kdpo_layers": ["--model.target.trainable", r"[model\.layers\.(16|17|18|19|20)\.mlp\.down_proj\.weight]"],
    "kdpo_replay3_editnull": REPLAY3 + EDIT_NULL,
    "kdpo_keyspan": KEY_SPAN,  # each update within the span of the edit's own keys
    "kdpo_replay3_keyspan": REPLAY3 + KEY_SPAN,
    "alphaedit_kdpo": quality.METHODS["alphaedit"] + ["--model.locate.v_objective", "kdpo"],  # KDPO's z, closed form
    "alphaedit_kdpo_margin2": quality.METHODS["alphaedit"] + ["--model.locate.v_objective", "kdpo",
                                                              "--model.locate.v_margin", "2.0"],  # z past the argmax
}
BASELINES = ("ftm", "kdpo", "alphaedit")
CAPABILITY = ["--retention.capability", "[mmlu, hellaswag]", "--retention.capability_n", "200"]

PER_REQUEST = {  # column: a request's key in the results (a fraction, or a bool)
    "Edit Succ.": "edit_success",
    "Rephrase": "rephrase",
    "Locality": "locality_mean",
    "Gen. EM": "gen_edit_success_em",
    "Gen. contains": "gen_edit_success_contains",
    "Edits made": "success",
}
SECONDS = "s / edit"
BENCHMARKS = {"MMLU": "capability/mmlu/acc", "HellaSwag": "capability/hellaswag/acc_norm"}
CAPABILITY_COLUMNS = {f"{name}{when}": (key, source) for name, key in BENCHMARKS.items()
                      for when, source in (("", "summary"), (" before", "capability_before"))}
COLUMNS = (*PER_REQUEST, SECONDS, *CAPABILITY_COLUMNS)
PLOTTED = {"Edit Succ. (teacher-forced)": "edit_success",
           "generated answer contains the target": "gen_edit_success_contains"}

Interval = tuple[float, float, float]  # mean, low, high
Runs = dict[str, dict]  # ordering: its results JSON


def orderings(setup: Setup) -> dict[str, list[dict]]:
    """{"tune": the first `tune` filtered records of the seed-0 shuffle, "0", "1": seeded samples of `size`
    from the rest}; the filter is the paper's same-subject filter on the raw records, as bench/quality.py's."""
    kept = quality.filtered_shuffle(setup.data)
    rest = kept[setup.tune:]
    if len(rest) < setup.size:
        raise ValueError(f"{setup.data}: {len(kept)} filtered records, fewer than {setup.tune} + {setup.size}")
    return {"tune": kept[:setup.tune], **{name: random.Random(seed).sample(rest, setup.size)
                                           for name, seed in ORDERING_SEEDS.items()}}


def run(ordering: str, method: str, *, out: Path, runs: Path, n: int, every: int, threads: int,
        forwarded: list[str]) -> str | None:
    """One sequential-edit run in its own process (quality.fit), resumed from its checkpoint if it was
    stopped, skipped if its results exist. Returns None, or what went wrong."""
    result = out / "lifelong" / f"{ordering}_{method}.json"
    if result.exists():
        return None
    data = quality.cli_path(out / "lifelong" / "orderings" / f"{ordering}.json")
    args = ["--data.path", data, "--data.n_edits", str(n), "--evaluation.generation", "true",
            "--evaluation.pre_edit_cache", quality.cli_path(out / "lifelong" / "pre_edit"),
            "--retention.every_n_edits", str(every), "--retention.light_points", "true", *CAPABILITY, *METHODS[method], *forwarded]
    checkpoints = out / "lifelong" / "checkpoints" / f"{ordering}_{method}"
    failed = quality.fit(f"{ordering}_{method}", args, runs / f"{ordering}_{method}", result, threads, checkpoints)
    if not failed:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the results are the record now
    return failed


def load(out: Path, names: list[str]) -> dict[str, Runs]:
    """{method: {ordering: results}} for every method with results on any of the orderings `names`, in
    METHODS order."""
    found = {}
    for method in METHODS:
        paths = {o: out / "lifelong" / f"{o}_{method}.json" for o in names}
        runs = {o: json.loads(p.read_text()) for o, p in paths.items() if p.exists()}
        if runs:
            found[method] = runs
    return found


def _per_ordering(runs: Runs, key: str) -> list[list[float]]:
    """Each ordering's per-request values of `key`, requests without one left out."""
    lists = [[r[key] for r in res["requests"] if r.get(key) is not None] for res in runs.values()]
    return [values for values in lists if values]


def columns(runs: Runs) -> dict[str, Interval | None]:
    """One method's table row at the last point: mean and 95% interval (resampling orderings, then requests)
    of each per-request metric (x100), of the seconds per edit, and of capability at the end and before."""
    row = {}
    for column, key in PER_REQUEST.items():
        per = _per_ordering(runs, key)
        row[column] = bootstrap(per) if per else None
    seconds = _per_ordering(runs, "seconds")
    row[SECONDS] = tuple(v / 100 for v in bootstrap(seconds)) if seconds else None  # bootstrap scales by 100
    for column, (key, source) in CAPABILITY_COLUMNS.items():
        per = [[res[source][key] / 100] for res in runs.values() if key in res.get(source, {})]
        row[column] = bootstrap(per) if per else None  # one value per ordering: an interval over orderings
    return row


def table(found: dict[str, Runs]) -> tuple[str, dict]:
    """The markdown table and its numbers, {method: {column: [mean, low, high] | None, ...}}."""
    head = "| method | orderings x N | " + " | ".join(COLUMNS) + " |"
    lines, rows = [head, "|" + "---|" * (len(COLUMNS) + 2)], {}
    for method, runs in found.items():
        sizes = sorted({res["n_edits"] for res in runs.values()})
        rows[method] = {"orderings": sorted(runs), "n_edits": sizes, **columns(runs)}
        cells = [_cell(rows[method][c], ".2f" if c == SECONDS else ".1f") for c in COLUMNS]
        lines.append(f"| {method} | {len(runs)} x {'/'.join(map(str, sizes))} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def _cell(value: Interval | None, spec: str) -> str:
    return "–" if value is None else f"{value[0]:{spec}} [{value[1]:{spec}}, {value[2]:{spec}}]"


def paired(a: Runs, b: Runs, key: str) -> Interval | None:
    """Mean and 95% interval of `a - b` in `key` (points), paired by request over the orderings both ran."""
    per = []
    for ordering in sorted(a.keys() & b.keys()):
        other = {r["index"]: r.get(key) for r in b[ordering]["requests"]}
        diffs = [r[key] - other[r["index"]] for r in a[ordering]["requests"]
                 if r.get(key) is not None and other.get(r["index"]) is not None]
        if diffs:
            per.append(diffs)
    return bootstrap(per) if per else None


def verdict(found: dict[str, Runs], rows: dict, best: str) -> tuple[str, dict]:
    """Does `best` keep >= 80 Edit Succ., beat every baseline in it by more than the paired interval, and keep
    locality no worse than the best baseline's (paired interval reaching 0)? And its cost per edit."""
    signed = "{:+.1f} [{:+.1f}, {:+.1f}]".format
    if best not in found:
        return f"Verdict: {best} has no results.", {"best": best, "answer": None}
    baselines = [b for b in BASELINES if b != best]
    missing = [b for b in baselines if b not in found]
    present = [b for b in baselines if b in found]
    edit = {b: paired(found[best], found[b], "edit_success") for b in present}
    locality = {b: paired(found[best], found[b], "locality_mean") for b in present}
    mean, low, high = rows[best]["Edit Succ."]
    facts = {"best": best, "edit_success": [mean, low, high], "keeps_80": mean >= 80, "missing": missing,
             "edit_success_minus": edit, "beats_all": all(e is not None and e[1] > 0 for e in edit.values())}
    n = "/".join(map(str, rows[best]["n_edits"]))
    text = [f"Verdict for {best} ({len(found[best])} orderings x {n} edits): Edit Succ. "
            f"{_cell(rows[best]['Edit Succ.'], '.1f')}, at least 80: {'yes' if facts['keeps_80'] else 'no'}."]
    if present:
        versus = ", ".join(f"{b} {signed(*edit[b]) if edit[b] else 'no common requests'}" for b in present)
        text.append(f"Edit Succ. minus {versus}; ahead of each by more than the interval: "
                    f"{'yes' if facts['beats_all'] else 'no'}.")
        known = {b: v for b, v in locality.items() if v is not None}
        if known:
            keeper = min(known, key=lambda b: known[b][0])  # the baseline whose locality is highest
            facts.update(locality_baseline=keeper, locality_minus=known[keeper], locality_kept=known[keeper][2] >= 0)
            text.append(f"Locality minus the best baseline's ({keeper}): {signed(*known[keeper])}; no worse within "
                        f"the interval: {'yes' if facts['locality_kept'] else 'no'}.")
    if missing:
        text.append(f"No results for {', '.join(missing)}: not compared.")
    if rows[best][SECONDS] and "kdpo" in rows and rows["kdpo"][SECONDS]:
        facts["cost_vs_kdpo"] = rows[best][SECONDS][0] / rows["kdpo"][SECONDS][0]
        text.append(f"Cost: {rows[best][SECONDS][0]:.2f} s per edit against {rows['kdpo'][SECONDS][0]:.2f} s for "
                    f"paper KDPO ({facts['cost_vs_kdpo']:.2f}x).")
    checks = [facts["keeps_80"], *([facts["beats_all"]] if present else []), facts.get("locality_kept", True)]
    facts["answer"] = False if not all(checks) else None if missing or "locality_kept" not in facts else True
    answer = {None: "not decided (baselines missing)", True: "yes", False: "no"}[facts["answer"]]
    text.append(f"All of these: {answer}.")
    return " ".join(text), facts


def curve_intervals(runs: Runs, key: str) -> list[tuple[int, float, float, float]]:
    """(edits, mean, low, high) at each curve point, the interval resampling orderings, then requests, from
    the points' per-request lists."""
    by_edits: dict[int, list[list[float]]] = {}
    for ordering, res in runs.items():
        for point in res.get("curve", []):
            if "per_request" not in point:
                raise ValueError(f"results of {ordering} ({res.get('method')}) have curve points without "
                                 "per_request lists: rerun them with the current CLI")
            values = [v for v in point["per_request"][key] if v is not None]
            if values:
                by_edits.setdefault(point["edits"], []).append(values)
    return [(edits, *bootstrap(per, reps=1000)) for edits, per in sorted(by_edits.items())]


def plot(found: dict[str, Runs], path: Path, title: str) -> Path:
    """One PNG, two panels (Edit Succ., generated containment) against edits applied: a line per method and
    its shaded 95% interval."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    panels = figure.subplots(1, 2, sharey=True)
    palette = colormaps["tab10"].colors
    for axes, (label, key) in zip(panels, PLOTTED.items()):
        for i, (method, runs) in enumerate(found.items()):
            points = curve_intervals(runs, key)
            if points:
                x, mean, low, high = zip(*points)
                axes.plot(x, mean, marker="o", color=palette[i % 10], label=f"{method} ({len(runs)})")
                axes.fill_between(x, low, high, color=palette[i % 10], alpha=0.2)
        axes.set(xlabel="edits applied", title=label, ylim=(0, 100))
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("requests edited so far (x100)")
    panels[1].legend(title="method (orderings)", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def saved_best(path: Path) -> str | None:
    """The variant the table at `path` was last judged on, so that a run or a table without --best keeps it."""
    if not path.exists():
        return None
    best = json.loads(path.read_text()).get("verdict", {}).get("best")
    return best if best in METHODS else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--orderings", nargs="+", default=list(ORDERING_SEEDS), choices=["tune", *ORDERING_SEEDS])
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=list(METHODS))
    parser.add_argument("--n", type=int, help=f"edits per run (default: {FULL.size}; {FULL.tune} on tune)")
    parser.add_argument("--every", type=int, help=f"edits between curve points (default {FULL.every})")
    parser.add_argument("--best", choices=list(METHODS), help="the variant judged against FT-M, paper KDPO and "
                        "AlphaEdit, paired by request (default: the one the saved table was last judged on, if any)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--table", action="store_true", help="only the table, verdict and plot of existing results")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK.data}, {QUICK.size} edits, a "
                        f"point every {QUICK.every}; pass a tiny model with --model.name_or_path")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="results go to OUT/lifelong/, the table and plot to OUT/<name>.json and .png")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "lifelong", help="run folders (checkpoints)")
    args, forwarded = parser.parse_known_args()
    unknown = [a for a in forwarded if a.startswith("--") and "." not in a]  # the CLI's flags are grouped
    if unknown:
        parser.error(f"unknown flags {unknown}")
    if "tune" in args.orderings and len(args.orderings) > 1:
        parser.error("the tuning ordering is screened apart from the report orderings: --orderings tune")
    setup = QUICK if args.quick else FULL
    out, runs = args.out.resolve(), args.runs.resolve()
    tune = args.orderings == ["tune"]
    started, failed = report.now(), []
    if not args.table:
        folder = out / "lifelong" / "orderings"
        folder.mkdir(parents=True, exist_ok=True)
        for name, records in orderings(setup).items():
            (folder / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False))
        n = args.n or (setup.tune if tune else setup.size)
        one = functools.partial(run, out=out, runs=runs, n=n, every=args.every or setup.every,
                                threads=args.threads, forwarded=forwarded)
        jobs = [(ordering, method) for ordering in args.orderings for method in args.methods]  # ordering-major
        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [f for f in pool.map(lambda job: one(*job), jobs) if f]
    found = load(out, args.orderings)
    if not found:
        sys.exit(f"no results in {out / 'lifelong'} for orderings {args.orderings}")
    text, rows = table(found)
    name = setup.name + ("_tune" if tune else "")
    best = args.best or saved_best(out / f"{name}.json")
    facts = {}
    if best:
        paragraph, facts = verdict(found, rows, best)
        text += "\n\n" + paragraph
    report.RESULTS = out  # report.save writes there
    picture = plot(found, out / f"{name}.png", f"{setup.data}, sequential edits, 95% intervals over orderings "
                                                 "and requests")
    report.save(name, text, started, orderings=args.orderings, rows=rows, verdict=facts,
                plot=quality.cli_path(picture))
    if failed:
        sys.exit("failed runs (the others finished): " + "; ".join(failed))


if __name__ == "__main__":
    main()
