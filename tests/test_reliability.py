"""Reliability (issue 8): kill and resume, determinism, failed edits, safe loading, bad inputs.

The run tests drive the real console entry in subprocesses on a tiny fp32 LLaMA on CPU; the
bad-input tests call `kdpo_lightning.cli.main([...])` in-process and fail before any edit runs.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_ZSRE, _corpus, _wrap, tiny_model
from safetensors.torch import load_file

from kdpo_lightning import sources
from kdpo_lightning.cli import main
from kdpo_lightning.data import encode, load_requests
from kdpo_lightning.module import KDPOEditor

REPO = Path(__file__).resolve().parents[1]
ZSRE = DEMO_ZSRE
N_EDITS, EVERY, STALL_AT = 30, 5, 12
"""30 edits, a checkpoint every 5; the killed run is held after edit 12, two edits past its last checkpoint."""
RUN_TIMEOUT = 420


@pytest.fixture(autouse=True)
def console_process(monkeypatch):
    """In-process `main(argv)` calls see the console script's command line, not pytest's, and the
    global seed that `seed_everything` puts in the environment is taken out again afterwards."""
    monkeypatch.setattr(sys, "argv", ["kdpo-lightning"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def _fit_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """The issue's tiny run: `fit` on the demo config pointed at a tiny model, results under `out`."""
    return ["fit", "--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--model.layer", "2",
            "--model.lr", "0.001", "--model.max_new_tokens", "8", "--model.fluency", "false",
            "--data.n_edits", str(N_EDITS), "--checkpoint.every_n_edits", str(EVERY),
            "--trainer.default_root_dir", str(out / "run"), "--model.results_path", str(out / "results.json"), *extra]


def _comparable(results: dict) -> dict:
    """A results JSON without what legitimately differs between two runs of the same config."""
    results = copy.deepcopy(results)
    del results["config"]["results"]  # each run writes its own file
    for request in results["requests"]:
        del request["seconds"]  # wall-clock time of the edit
    return results


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "results.edit.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    """Same trained tensors (bitwise) and the same results JSON but for timings and the results path."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() == {"model.layers.2.mlp.down_proj.weight"}
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert _comparable(ra) == _comparable(rb)


# ----------------------------------------------------------------------------- subprocess runs

# The killed and resumed runs go through this wrapper of the console entry: it appends the index of each
# finished edit to $KDPO_TEST_EDIT_LOG and, if asked, holds the process right after edit $KDPO_TEST_STALL_AT
# (so that the SIGKILL lands mid-run, after edits the last checkpoint does not hold, whatever the machine's load).
WRAPPER = textwrap.dedent("""
    import os, sys, time
    from kdpo_lightning import cli
    from kdpo_lightning.module import KDPOEditor

    log, stall = os.environ["KDPO_TEST_EDIT_LOG"], int(os.environ.get("KDPO_TEST_STALL_AT", "-1"))
    step = KDPOEditor.training_step

    def training_step(self, batch, batch_idx):
        out = step(self, batch, batch_idx)
        with open(log, "a") as f:
            f.write(f"{int(batch['index'])}\\n")
        if int(batch["index"]) == stall:
            time.sleep(3600)
        return out

    KDPOEditor.training_step = training_step
    sys.exit(cli.main())  # reads sys.argv, as the console script does
""")


class Runs:
    """Subprocesses started by this module, killed (by their own pid) at teardown if still running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], out: Path, name: str, **env: str) -> subprocess.Popen:
        out.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **env}
        with open(out / f"{name}.out", "wb") as log:
            proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=environ, stdout=log,
                                    stderr=subprocess.STDOUT)
        proc.log = out / f"{name}.out"
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait(proc: subprocess.Popen) -> None:
        rc = proc.wait(timeout=RUN_TIMEOUT)
        assert rc == 0, f"{proc.args} exited {rc}:\n{proc.log.read_text()[-3000:]}"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _records_in(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=False)["kdpo"]["records"]
    except FileNotFoundError:
        return {}


def _edit_log(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """Four runs of the same 30-edit config, two at a time (the machine has few cores):
    `full` and `second` uninterrupted; `killed` SIGKILLed after >= 10 edits are checkpointed,
    then `resumed` from its `last.ckpt` in the same directory with the same arguments."""
    root = tmp_path_factory.mktemp("runs")
    full, second, killed = root / "full", root / "second", root / "killed"
    wrapper = root / "edit_logging_cli.py"
    wrapper.write_text(WRAPPER)
    procs = Runs()
    try:
        p_full = procs.start(["-m", "kdpo_lightning.cli", *_fit_args(model_dir, full)], full, "full")
        p_kill = procs.start([str(wrapper), *_fit_args(model_dir, killed)], killed, "killed",
                             KDPO_TEST_EDIT_LOG=str(killed / "killed_edits.txt"), KDPO_TEST_STALL_AT=str(STALL_AT))
        ckpt = killed / "run" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (len(_records_in(ckpt)) >= 10 and STALL_AT in _edit_log(killed / "killed_edits.txt")):
            assert p_kill.poll() is None, f"the run to kill ended by itself:\n{p_kill.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint with 10 edits in time"
            time.sleep(0.2)
        p_kill.send_signal(signal.SIGKILL)
        assert p_kill.wait(timeout=60) == -signal.SIGKILL
        at_kill = {
            "results_exists": (killed / "results.json").exists(),
            "edit_exists": (killed / "results.edit.safetensors").exists(),
            "ckpt": torch.load(ckpt, map_location="cpu", weights_only=False),
            "edits_before_kill": _edit_log(killed / "killed_edits.txt"),
        }
        p_resume = procs.start([str(wrapper), *_fit_args(model_dir, killed, "--ckpt_path", "last")], killed,
                               "resumed", KDPO_TEST_EDIT_LOG=str(killed / "resumed_edits.txt"))
        p_second = procs.start(["-m", "kdpo_lightning.cli", *_fit_args(model_dir, second)], second, "second")
        for proc in (p_full, p_resume, p_second):
            procs.wait(proc)
    finally:
        procs.close()
    return {"full": full, "second": second, "killed": killed, "at_kill": at_kill,
            "resumed_edits": _edit_log(killed / "resumed_edits.txt")}


def test_killed_run_resumes_to_the_same_result(runs):
    at_kill = runs["at_kill"]
    # killed mid-run: after edit 12, with 10 edits checkpointed and nothing final written yet
    assert at_kill["edits_before_kill"] == list(range(STALL_AT + 1))
    assert not at_kill["results_exists"] and not at_kill["edit_exists"]
    assert sorted(at_kill["ckpt"]["kdpo"]["records"]) == list(range(10))
    assert at_kill["ckpt"]["SequentialEditDataModule"]["position"] == 10
    assert at_kill["ckpt"]["optimizer_states"] == []  # a fresh Adam per edit: no moments to keep
    # the resumed process began at the edit after the checkpoint and did each remaining edit once
    assert runs["resumed_edits"] == list(range(10, N_EDITS))
    results = json.loads((runs["killed"] / "results.json").read_text())
    assert [r["index"] for r in results["requests"]] == list(range(N_EDITS))
    assert results["n_edits"] == N_EDITS
    _assert_same_run(runs["full"], runs["killed"])


def test_same_config_and_seed_give_the_same_run(runs):
    _assert_same_run(runs["full"], runs["second"])


# ----------------------------------------------------------------------------- failed edits


def _poisoned_kdpo_loss(monkeypatch, should_poison):
    """kdpo_loss, as loop.py looks it up, returning NaN (still differentiable) where `should_poison(y_w)`."""
    from kdpo_lightning import objective

    real = objective.kdpo_loss

    def kdpo_loss(rows, ref_rows, y_w, y_l, *args, **kwargs):
        loss = real(rows, ref_rows, y_w, y_l, *args, **kwargs)
        return loss * float("nan") if should_poison(y_w) else loss

    monkeypatch.setattr("kdpo_lightning.loop.objective.kdpo_loss", kdpo_loss)


def test_non_finite_edit_is_rolled_back_and_the_run_goes_on(monkeypatch, bpe_tokenizer):
    requests = [load_requests(ZSRE)[i] for i in (0, 1, 5)]  # 5: an edit that succeeds after edit 0
    poison = {"on": False}
    _poisoned_kdpo_loss(monkeypatch, lambda y_w: poison["on"])
    editor = KDPOEditor.from_model(tiny_model("llama"), bpe_tokenizer, lr=1e-3)
    (name,) = editor.policy.params
    tensor = editor.policy.params[name]

    first = editor.edit(requests[0])
    assert first.success and first.failed is None
    before = tensor.detach().clone()
    poison["on"] = True
    failed = editor.edit(requests[1])
    poison["on"] = False
    assert failed.failed == "the loss became non-finite" and failed.success is False
    assert torch.equal(tensor, before)  # bitwise the pre-edit weights
    third = editor.edit(requests[2])
    assert third.failed is None and third.success and third.steps > 0

    # the failed edit left no trace: the same as editing requests 0 and 2 only
    clean = KDPOEditor.from_model(tiny_model("llama"), bpe_tokenizer, lr=1e-3)
    clean.edit(requests[0])
    assert clean.edit(requests[2]).losses == third.losses
    assert torch.equal(clean.policy.params[name], tensor)


def test_non_finite_edit_is_recorded_as_failed_in_a_cli_run(monkeypatch, tmp_path, model_dir, bpe_tokenizer):
    """Through the Trainer: edit 1 of 3 gets a NaN loss, the run finishes and the results say which failed."""
    r = load_requests(ZSRE)[1]
    bad = encode(bpe_tokenizer, r.prompt, r.target_new).target_ids
    _poisoned_kdpo_loss(monkeypatch, lambda y_w: tuple(y_w.tolist()) == bad)
    assert main(_fit_args(model_dir, tmp_path, "--data.n_edits", "3", "--trainer.logger", "false")) == 0
    requests = json.loads((tmp_path / "results.json").read_text())["requests"]
    assert [r["index"] for r in requests] == [0, 1, 2]
    assert requests[1]["failed"] == "the loss became non-finite" and requests[1]["success"] is False
    assert requests[0]["failed"] is None and requests[2]["failed"] is None and requests[2]["steps"] > 0


# ----------------------------------------------------------------------------- safe loading


def test_cli_exposes_allow_pickle_and_distrusts_remote_code(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "configs/demo.yaml", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    model = printed[printed.index("\nmodel:"):]
    assert "  allow_pickle: false\n" in model
    assert "  trust_remote_code: false\n" in model


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, model_dir) -> Path:
    """What an earlier good run left: results.json, results.edit.safetensors and run/checkpoints/last.ckpt."""
    out = tmp_path_factory.mktemp("good")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["kdpo-lightning"])
        mp.delenv("PL_GLOBAL_SEED", raising=False)  # set by seed_everything; restored on exit
        assert main(_fit_args(model_dir, out, "--data.n_edits", "2", "--model.n_cycles", "2",
                              "--trainer.logger", "false")) == 0
    return out


@pytest.fixture
def run_dir(tmp_path, good_run):
    """A copy of the good run's outputs: (out dir, its files' bytes) for the no-damage check."""
    out = tmp_path / "out"
    for rel in ("results.json", "results.edit.safetensors", "run/checkpoints/last.ckpt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good_run / rel, out / rel)
    return out, _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    files = [*out.glob("*.json"), *out.glob("*.safetensors"), *(out / "run" / "checkpoints").iterdir()]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _fails(capsys, run_dir, model_dir, *extra: str, model: Path | None = None) -> str:
    """Run `fit` with `extra` args in-process; assert exit 2, a clear error (no traceback), no file damaged.
    Returns the error message."""
    out, before = run_dir
    args = _fit_args(model or model_dir, out, "--data.n_edits", "3", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.index("kdpo-lightning: error: ") + len("kdpo-lightning: error: "):].rstrip("\n")
    assert _snapshot(out) == before, "a failing command changed an earlier run's files"
    return message


def _data_file(tmp_path: Path, records, name: str = "edits.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def _data(path: Path) -> list[str]:
    """Args for a small data file: all of its records."""
    return ["--data.path", str(path), "--data.n_edits", "null"]


def _record(prompt: str = "What is the capital of Freedonia?", target: str = "Paris") -> dict:
    return {"prompt": prompt, "target_new": target, "subject": "Freedonia"}


def test_missing_model_dir(capsys, run_dir, model_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    msg = _fails(capsys, run_dir, model_dir, model=missing)
    assert msg.startswith(f"model '{missing}' not found. Looked for:\n")
    assert f"no directory at {missing}" in msg and "the Hugging Face hub: not a hub id" in msg


def test_missing_data_file(capsys, run_dir, model_dir, tmp_path):
    missing = tmp_path / "missing.json"
    assert _fails(capsys, run_dir, model_dir, "--data.path", str(missing)) == f"{missing}: no such file"


def test_corrupt_data_file(capsys, run_dir, model_dir, tmp_path):
    path = _data_file(tmp_path, '[{"prompt": "a", "target_new": ')
    msg = _fails(capsys, run_dir, model_dir, *_data(path))
    assert msg == f"{path}: not valid JSON at line 1 column 32: Expecting value"


def test_zero_edits(capsys, run_dir, model_dir):
    msg = _fails(capsys, run_dir, model_dir, "--data.n_edits", "0")
    assert msg == "n_edits must be at least 1 (or null for all), got 0"


def test_data_file_without_records(capsys, run_dir, model_dir, tmp_path):
    path = _data_file(tmp_path, [])
    assert _fails(capsys, run_dir, model_dir, *_data(path)) == f"{path}: no records"


def test_every_record_skipped(capsys, run_dir, model_dir, tmp_path):
    path = _data_file(tmp_path, [_record(target=""), {"prompt": "p", "target_new": "t"}])
    with pytest.warns(UserWarning, match="skipped 2 of 2 bad records"):
        msg = _fails(capsys, run_dir, model_dir, *_data(path), "--data.on_bad_record", "skip")
    assert msg == f"{path}: none of its 2 records is usable"


def test_blank_target(capsys, run_dir, model_dir, tmp_path):
    """A whitespace-only target is refused when the file is read, before tokenizing."""
    path = _data_file(tmp_path, [_record(target=" ")])
    assert _fails(capsys, run_dir, model_dir, *_data(path)) == f"{path}#0 field 'target_new': empty string"


@pytest.fixture(scope="module")
def dropping_model_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA with a BPE tokenizer that has no byte fallback and no unk token: it drops characters it
    never saw, so a target of such characters tokenizes to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"]))
    path = tmp_path_factory.mktemp("dropping-tokenizer")
    tiny_model("llama").save_pretrained(path)
    _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(path)
    return path


def test_target_that_tokenizes_to_nothing(capsys, run_dir, model_dir, dropping_model_dir, tmp_path):
    path = _data_file(tmp_path, [_record(target="☃☃")])
    msg = _fails(capsys, run_dir, model_dir, *_data(path), model=dropping_model_dir)
    assert msg == ("edits.json#0 field 'target': target '☃☃' tokenizes to nothing after prompt "
                   "'What is the capital of Freedonia?'")


def test_prompt_longer_than_the_context(capsys, run_dir, model_dir, tmp_path):
    path = _data_file(tmp_path, [_record(prompt=" ".join(["capital"] * 2000) + "?")])
    msg = _fails(capsys, run_dir, model_dir, *_data(path))
    assert msg.startswith("edits.json#0: prompt + target is ")
    assert msg.endswith(" tokens, longer than the model's context of 256")


def test_zero_cycles(capsys, run_dir, model_dir):
    assert _fails(capsys, run_dir, model_dir, "--model.n_cycles", "0") == "n_cycles must be at least 1, got 0"


def test_negative_lr(capsys, run_dir, model_dir):
    assert _fails(capsys, run_dir, model_dir, "--model.lr", "-0.001") == "lr must be positive, got -0.001"


def test_trainable_pattern_matching_nothing(capsys, run_dir, model_dir):
    msg = _fails(capsys, run_dir, model_dir, "--model.trainable", "[model.layers.9.mlp.nope]")
    assert msg.startswith("trainable pattern 'model.layers.9.mlp.nope' matches no parameter; closest names: [")
    assert "'model.layers.2.mlp.down_proj.weight'" in msg


def test_layer_out_of_range(capsys, run_dir, model_dir):
    msg = _fails(capsys, run_dir, model_dir, "--model.layer", "99")
    assert msg == "layer 99 is out of range for a model with 4 layers"


def test_checkpoint_every_zero_edits(capsys, run_dir, model_dir):
    msg = _fails(capsys, run_dir, model_dir, "--checkpoint.every_n_edits", "0")
    assert msg == "every_n_edits must be at least 1, got 0"


def test_garbage_checkpoint(capsys, run_dir, model_dir, tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    msg = _fails(capsys, run_dir, model_dir, "--ckpt_path", str(path))
    assert msg.startswith(f"checkpoint {path} is corrupt or not a checkpoint (")


def test_truncated_checkpoint(capsys, run_dir, model_dir, tmp_path):
    out, _ = run_dir
    path = tmp_path / "truncated.ckpt"
    whole = (out / "run" / "checkpoints" / "last.ckpt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    msg = _fails(capsys, run_dir, model_dir, "--ckpt_path", str(path))
    assert msg.startswith(f"checkpoint {path} is corrupt or not a checkpoint (")


class _CreatesFile:
    """Unpickling this runs `touch PATH`: what a crafted checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("resume_last", [False, True])
def test_crafted_checkpoint_is_refused_and_runs_nothing(capsys, run_dir, model_dir, tmp_path, resume_last):
    marker, path = tmp_path / "created-by-the-checkpoint", tmp_path / "ckpts" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"kdpo": _CreatesFile(marker), "state_dict": {}}, path)
    torch.load(path, weights_only=False)  # the file really runs code when unpickled the unsafe way
    assert marker.exists()
    marker.unlink()
    args = ("--ckpt_path", "last", "--checkpoint.dirpath", str(path.parent)) if resume_last else ("--ckpt_path", str(path))
    msg = _fails(capsys, run_dir, model_dir, *args)
    assert msg == (f"checkpoint {path} refused: it holds pickled objects other than tensors and plain data, and "
                   "loading them could run code (kdpo-lightning checkpoints never do)")
    assert not marker.exists()


def test_named_data_set_not_found(capsys, run_dir, model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "data_dirs", lambda: [tmp_path / "data"])
    msg = _fails(capsys, run_dir, model_dir, "--data.path", "knowedit/wikibio")
    assert msg.startswith("data set 'knowedit/wikibio' (WikiBio/wikibio-test-all.json) not found. Looked in:\n"
                          f"  - {tmp_path / 'data' / 'WikiBio' / 'wikibio-test-all.json'}\nGet the KnowEdit data set")


def test_foreign_checkpoint(capsys, run_dir, model_dir, tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    msg = _fails(capsys, run_dir, model_dir, "--ckpt_path", str(path))
    assert msg == f"checkpoint {path} was not written by kdpo-lightning (no 'kdpo' state)"


def test_missing_checkpoint(capsys, run_dir, model_dir, tmp_path):
    path = tmp_path / "nowhere.ckpt"
    assert _fails(capsys, run_dir, model_dir, "--ckpt_path", str(path)) == f"checkpoint {path} does not exist"


def test_resume_last_without_a_checkpoint(capsys, run_dir, model_dir, tmp_path):
    empty = tmp_path / "no-checkpoints"
    msg = _fails(capsys, run_dir, model_dir, "--ckpt_path", "last", "--checkpoint.dirpath", str(empty))
    assert msg == f"--ckpt_path last: no checkpoint at {empty / 'last.ckpt'}; start without --ckpt_path"


def test_argument_of_the_wrong_type(capsys, run_dir, model_dir):
    out, before = run_dir
    with pytest.raises(SystemExit) as exit_:
        main(_fit_args(model_dir, out, "--model.lr", "fast"))
    assert exit_.value.code == 2
    assert 'error: Parser key "model.edit.lr":\n  Expected a <class \'float\'>. Got value: fast' in capsys.readouterr().err
    assert _snapshot(out) == before


def test_two_processes_writing_one_file_each_rename_a_whole_one(tmp_path):
    """Two runs filling one cache write the same file at once: while this process holds its temp file,
    another writes and renames its own; both finish, the file is whole and no temp file is left."""
    from kdpo_lightning.saving import atomic_write

    path = tmp_path / "shared.json"
    other = textwrap.dedent(f"""
        from kdpo_lightning.saving import atomic_write
        with atomic_write({str(path)!r}) as tmp:
            tmp.write_text("theirs")
    """)
    with atomic_write(path) as tmp:
        tmp.write_text("ours")
        subprocess.run([sys.executable, "-c", other], check=True)
        assert path.read_text() == "theirs"
    assert path.read_text() == "ours" and [p.name for p in tmp_path.iterdir()] == ["shared.json"]
