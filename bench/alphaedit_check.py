"""Is `kdpo_lightning.locate` the official AlphaEdit (and MEMIT)? Both codes edit the same model with the same
requests, covariance, null-space projector P and context templates; their weight changes must agree to a
relative error (Frobenius) below 1e-3 in every edited layer and every sequential batch (issue 23).

    git clone https://github.com/jianghoucheng/AlphaEdit /tmp/AlphaEdit       # the official code: never committed
    PYTHONPATH=. python bench/alphaedit_check.py /tmp/AlphaEdit               # SmolLM2-135M, CPU, a few minutes

Prints a table and writes bench/results/alphaedit_check.json. What had to be adapted for the official code to
run here, none of it its arithmetic:
- device: its files hard-code "cuda"; they are imported with "cuda" read as `--device` (text substitution at
  import; nothing else in the source changes).
- transformers 5: decoder layers return a tensor, while the official hooks index the tuple transformers 4
  returned; hooks it registers on a decoder layer see the output as a 1-tuple and hand back the tensor.
- statistics: its `get_cov` would read Wikipedia second moments (a download): it returns our covariance
  instead. P is passed in, as its experiments/evaluate.py does; that file's `get_project` (read from the
  file: the module's other imports, MEND and GLUE evaluation, are not installed here) also runs on the same
  covariance, and its P is compared with ours.
- context templates: its cache is set to ours (it samples them unseeded); padding side: right, as it assumes.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.machinery
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import report
import torch
import transformers

from kdpo_lightning.constraints import key_covariances, preserved_batches, projection_module
from kdpo_lightning.data import load_requests
from kdpo_lightning.locate import LocateConfig, LocateThenEdit, default_layers, edited_weight_names
from kdpo_lightning.models import load_model
from kdpo_lightning.policy import find_layers

OFFICIAL_HPARAMS = {"alphaedit": "hparams/AlphaEdit/Llama3-8B.json", "memit": "hparams/MEMIT/Llama3-8B.json"}
SAME_SETTINGS = {"v_lr": "v_lr", "v_num_grad_steps": "v_num_grad_steps", "v_weight_decay": "v_weight_decay",
                 "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
                 "mom2_update_weight": "mom2_update_weight", "nullspace_threshold": "nullspace_threshold", "l2": "L2"}
"""LocateConfig field -> official hparams key: the defaults must be the official LLaMA3-8B values."""


def import_official(root: Path, device: str) -> dict:
    """The official modules, imported from `root` with "cuda" read as `device`."""

    class DeviceLoader(importlib.machinery.SourceFileLoader):
        def get_code(self, fullname):
            source = self.get_data(self.path).decode()
            source = source.replace('"cuda"', repr(device)).replace(".cuda()", f".to({device!r})")
            return compile(source, self.path, "exec", dont_inherit=True)

    def hook(path: str):
        if Path(path).resolve().is_relative_to(root):
            return importlib.machinery.FileFinder(path, (DeviceLoader, [".py"]))
        raise ImportError(path)

    sys.path_hooks.insert(0, hook)
    sys.path.insert(0, str(root))
    sys.path_importer_cache.clear()
    cwd = os.getcwd()
    os.chdir(root)  # util/globals.py reads globals.yml from the working directory
    try:
        from AlphaEdit import AlphaEdit_main
        from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams
        from memit import memit_main
        from memit.memit_hparams import MEMITHyperParams
    finally:
        os.chdir(cwd)
    return {"alphaedit": (AlphaEdit_main, AlphaEditHyperParams), "memit": (memit_main, MEMITHyperParams)}


def official_get_project(root: Path, get_cov):
    """`get_project` of experiments/evaluate.py, compiled alone, with `get_cov` given."""
    path = root / "experiments" / "evaluate.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_project")
    namespace = {"torch": torch, "get_cov": get_cov}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["get_project"]


@contextlib.contextmanager
def tuple_outputs(layers):
    """Hooks registered on these layers see their output as transformers 4's 1-tuple."""

    def register(layer):
        def register_forward_hook(hook, *args, **kwargs):
            def as_tuple(module, inputs, output):
                result = hook(module, inputs, (output,))
                return result[0] if isinstance(result, tuple) else result
            return type(layer).register_forward_hook(layer, as_tuple, *args, **kwargs)
        return register_forward_hook

    for layer in layers:
        layer.register_forward_hook = register(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.register_forward_hook


def official_request(index: int, request) -> dict:
    at = request.prompt.index(request.subject)
    template = request.prompt[:at] + "{}" + request.prompt[at + len(request.subject):]
    return {"case_id": index, "prompt": template, "subject": request.subject, "target_new": {"str": request.target_new}}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def run_ours(model, tokenizer, method, config, covariances, batches, names):
    """Our weight changes per batch, and the editor (for its templates, P and K_p K_p^T)."""
    editor = LocateThenEdit(model, tokenizer, method, config, covariances)
    changes, records = [], []
    for batch in batches:
        before = {n: model.get_parameter(n).detach().clone() for n in names}
        records.append([r.as_dict() for r in editor.edit(batch)])
        changes.append({n: model.get_parameter(n).detach() - before[n] for n in names})
    return editor, changes, records


def run_official(module, hparams, model, tokenizer, method, batches, names, projectors):
    """The official weight changes per batch, its printed z losses, and its K_p K_p^T (`cache_c`, AlphaEdit)."""
    _, blocks = find_layers(model)
    changes, logs = [], []
    cache_c = None if projectors is None else torch.zeros_like(projectors)
    start = 0
    for batch in batches:
        requests = [official_request(start + i, r) for i, r in enumerate(batch)]
        start += len(batch)
        before = {n: model.get_parameter(n).detach().clone() for n in names}
        out = io.StringIO()
        with contextlib.redirect_stdout(out), tuple_outputs(list(blocks)):
            if method == "alphaedit":
                _, cache_c = module.apply_AlphaEdit_to_model(model, tokenizer, requests, hparams, cache_c=cache_c,
                                                             P=projectors)
            else:
                module.apply_memit_to_model(model, tokenizer, requests, hparams)
        changes.append({n: model.get_parameter(n).detach() - before[n] for n in names})
        logs.append([float(m.group(1)) for m in re.finditer(r"^loss (\S+) =", out.getvalue(), re.M)])
    return changes, logs, cache_c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="a checkout of github.com/jianghoucheng/AlphaEdit")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="sizes of the sequential batches")
    parser.add_argument("--n_texts", type=int, default=50, help="HellaSwag and MMLU texts each, for the covariance")
    parser.add_argument("--methods", nargs="+", default=["alphaedit", "memit"], choices=["alphaedit", "memit"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="alphaedit_check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, root = report.now(), args.official.resolve()
    official = import_official(root, args.device)

    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    tokenizer.padding_side = "right"
    config = LocateConfig()
    _, blocks = find_layers(model)
    layers = default_layers(len(blocks))
    names = edited_weight_names(model, layers)
    requests, batches = load_requests("demo/zsre"), []
    for size in args.batches:
        batches.append(requests[sum(map(len, batches)):][:size])
    t = time.perf_counter()
    modules = {n: projection_module(model, n) for n in names}
    texts = preserved_batches(tokenizer, args.n_texts, 0, torch.device(args.device))
    covariances = key_covariances(model, modules, texts)
    print(f"covariance of {len(texts)} texts, layers {layers}: {time.perf_counter() - t:.0f} s", flush=True)
    original = {n: model.get_parameter(n).detach().clone() for n in names}

    def get_cov(model, tok, layer_name, *rest, **kwargs):
        return covariances[f"{layer_name}.weight"].to(args.device)

    def restore() -> None:
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).copy_(original[n])

    get_project = official_get_project(root, get_cov)
    rows, results, templates = [], {}, None
    for method in args.methods:
        module, hparams_class = official[method]
        hparams = hparams_class.from_json(root / OFFICIAL_HPARAMS[method])
        differ = {f: (getattr(config, f), getattr(hparams, k)) for f, k in SAME_SETTINGS.items()
                  if hasattr(hparams, k) and getattr(config, f) != getattr(hparams, k)}
        if differ:
            raise SystemExit(f"LocateConfig defaults differ from {OFFICIAL_HPARAMS[method]}: {differ}")
        hparams.layers, hparams.v_loss_layer = layers, len(blocks) - 1  # scaled layers; the last layer, as 31 of 32
        module.get_cov = get_cov

        t = time.perf_counter()
        editor, ours, records = run_ours(model, tokenizer, method, config, covariances, batches, names)
        seconds_ours = time.perf_counter() - t
        restore()
        templates = editor.templates
        module.CONTEXT_TEMPLATES_CACHE = [["{}"], [prefix + "{}" for prefix in templates[1:]]]
        projectors, projector_check = None, {}
        if method == "alphaedit":
            projectors = torch.stack([editor.projectors[n].cpu() for n in names])
            for i, layer in enumerate(layers):
                with contextlib.redirect_stdout(io.StringIO()):
                    theirs = get_project(model, tokenizer, layer, hparams)
                projector_check[names[i]] = {"dimensions_ours": round(float(projectors[i].trace())),
                                             "dimensions_official": round(float(theirs.trace())),
                                             "relative_error": relative_error(projectors[i], theirs)}
        t = time.perf_counter()
        theirs, logs, cache_c = run_official(module, hparams, model, tokenizer, method, batches, names, projectors)
        seconds_official = time.perf_counter() - t
        restore()
        errors = [{n: relative_error(o[n], th[n]) for n in names} for o, th in zip(ours, theirs)]
        for b, batch in enumerate(batches):
            for n in names:
                rows.append(f"| {method} | {b + 1} ({len(batch)} req.) | `{n}` | {ours[b][n].norm():.4g} | "
                            f"{theirs[b][n].norm():.4g} | {errors[b][n]:.2e} |")
        results[method] = {
            "max_relative_error": max(max(e.values()) for e in errors), "relative_errors": errors,
            "projector_check": projector_check,
            "edited_keys_relative_error": None if cache_c is None else {
                n: relative_error(editor.edited[n].cpu(), cache_c[i]) for i, n in enumerate(names)},
            "z_losses_ours": [[r["losses"] for r in batch] for batch in records], "z_losses_official": logs,
            "success_ours": [[r["success"] for r in batch] for batch in records],
            "seconds_ours": seconds_ours, "seconds_official": seconds_official,
        }
        print(f"{method}: max relative error {results[method]['max_relative_error']:.2e}", flush=True)

    table = "\n".join(["| method | batch | weight | ‖ΔW‖ ours | ‖ΔW‖ official | relative error |",
                       "|---|---|---|---|---|---|", *rows])
    passed = all(r["max_relative_error"] < 1e-3 for r in results.values())
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    report.save(args.out, table, started, model=args.model, device=args.device, threads=args.threads,
                torch=torch.__version__, transformers=transformers.__version__, official_commit=commit.strip() or None,
                layers=layers, batches=[[r.prompt for r in b] for b in batches], n_texts=args.n_texts,
                templates=templates, results=results, passed=passed)
    print("PASS" if passed else "FAIL: a relative error is 1e-3 or more")


if __name__ == "__main__":
    main()
