"""Replay (`EditConfig.replay`): an edit rehearses earlier edits in the same left-padded forward. Its rows
equal each sequence's own, its loss is the sum of the per-edit losses of the edit and of the replays that
do not hold, it stops once all hold, and over a sequence it keeps earlier edits better than plain KDPO."""
import json

import pytest
import torch
from conftest import DEMO_ZSRE, tiny_model

from kdpo_lightning import objective
from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, greedy_continuation, run_edit
from kdpo_lightning.policy import Policy, find_layers, target_rows
from kdpo_lightning.reference import make_reference
from kdpo_lightning import module as editor_module
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.replay import EditBatch, Rehearsal, replays_held

DTYPES = [torch.float32, torch.bfloat16]
RECORDS = json.loads(DEMO_ZSRE.read_text())
SHORT = EditConfig(lr=1e-3, n_cycles=1, n_steps=3, early_stop=False)
TOLERANCE = {torch.float32: {"abs": 1e-5}, torch.bfloat16: {"rel": 1e-3}}
"""Losses of a batched and of a per-sequence path: bf16 rounds each row's forward differently."""


def _request(tokenizer, i: int) -> tuple[torch.Tensor, int]:
    """c+y_w (1, T) of bundled ZsRE record i, and where y_w starts."""
    encoded = encode(tokenizer, RECORDS[i]["prompt"], RECORDS[i]["target_new"])
    return torch.tensor([encoded.input_ids]), encoded.target_start


def _held_request(model, tokenizer, i: int, n: int = 3) -> tuple[torch.Tensor, int]:
    """Record i's prompt followed by the model's own greedy n tokens: an edit the model already holds."""
    prompt = torch.tensor([tokenizer(RECORDS[i]["prompt"])["input_ids"]])
    return torch.cat([prompt, greedy_continuation(model, prompt, n)], dim=1), prompt.shape[1]


def _rows_alone(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The sequence's target rows (n, V) from a full forward of it alone (no cache, no padding)."""
    with torch.no_grad():
        return target_rows(model, ids.shape[1] - start, input_ids=ids)[0]


def _holds(model, ids: torch.Tensor, start: int) -> bool:
    return bool(torch.equal(_rows_alone(model, ids, start).argmax(-1), ids[0, start:]))


def _edit(model, ids, start, config: EditConfig, replays=()):
    policy = Policy(model)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    reference = make_reference("cached") if config.method == "kdpo" else None
    return run_edit(policy, reference, ids, start, config, optimizer, replays=replays)


def _independent_losses(model, edits, config: EditConfig) -> list[float]:
    """One cycle of `config.n_steps` steps by another path: each edit's rows from its own full forward,
    its loss from `objective`, summed over `edits` (the ones that should be rehearsed). The Policy only
    holds the trained tensor (its fp32 master in bf16)."""
    policy = Policy(model)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    start_rows = [_rows_alone(model, ids, start) for ids, start in edits]
    losses = []
    policy.begin_edit()
    for _ in range(config.n_steps):
        total = 0
        for (ids, start), ref_rows in zip(edits, start_rows):
            rows, y_w = target_rows(model, ids.shape[1] - start, input_ids=ids)[0], ids[0, start:]
            if config.method == "ftm":
                total = total + objective.ftm_loss(rows, y_w)
            else:
                total = total + objective.kdpo_loss(rows, ref_rows, y_w, ref_rows.argmax(-1), config.beta)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        policy.step_done()
        losses.append(total.item())
    policy.end_edit()
    return losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["projection", "layer", "off"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary positions; learned ones, which see a shift
def test_left_padded_batch_rows_equal_each_sequence_run_alone(bpe_tokenizer, arch, dtype, cache):
    """Every row's own target rows of one left-padded forward (through the prefix cache, captured once
    with the batch's mask and positions) equal that sequence's full forward alone."""
    model = tiny_model(arch).to(dtype)
    edits = [_request(bpe_tokenizer, i) for i in (0, 2, 4)]  # targets of different lengths
    batch = EditBatch.of(*edits[0], edits[1:])
    assert len(set(batch.lengths)) > 1 and batch.padding["attention_mask"].eq(0).any()
    policy = Policy(model, prefix_cache=cache != "off")
    if cache == "layer":
        policy._prefix.projection = False
    lowest = []  # attention runs in layer 0 only where its output is not replayed
    attention = next(m for name, m in find_layers(model)[1][0].named_children() if "attn" in name)
    attention.register_forward_pre_hook(lambda *args: lowest.append(1))
    policy.begin_edit()
    first = policy.rows(batch.input_ids, batch.n, **batch.padding)
    again = policy.rows(batch.input_ids, batch.n, **batch.padding)
    policy.end_edit()
    if cache == "projection":
        assert policy._prefix.projection
    assert len(lowest) == (2 if cache == "off" else 1)  # with the cache: its capture, then replayed
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    for row, (ids, start) in enumerate(edits):
        alone = _rows_alone(model, ids, start)
        assert batch.own(first, row).shape == alone.shape
        atol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: within its resolution (2^-8 relative)
        torch.testing.assert_close(batch.own(first, row), alone, atol=atol, rtol=0)
        assert torch.equal(batch.target(row), ids[0, start:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["kdpo", "ftm"])
def test_step_loss_is_the_sum_over_the_edit_and_the_replays_not_yet_kept(bpe_tokenizer, dtype, method):
    """Replays: one the model holds (it adds nothing, though FT-M's loss on it has a gradient) and one it
    does not. The steps' losses, hence also their gradients, equal the per-sequence path over the edit
    and the replay not kept."""
    model, independent = tiny_model("llama").to(dtype), tiny_model("llama").to(dtype)
    edit, missed = _request(bpe_tokenizer, 0), _request(bpe_tokenizer, 1)
    held = _held_request(model, bpe_tokenizer, 2)
    assert _holds(model, *held) and not _holds(model, *edit) and not _holds(model, *missed)
    config = EditConfig(method=method, lr=1e-3, n_cycles=1, n_steps=3, early_stop=False)
    record = _edit(model, *edit, config, replays=[held, missed])
    expected = _independent_losses(independent, [edit, missed], config)
    assert record.replays == 2 and record.steps == 3
    assert record.losses == pytest.approx(expected, **TOLERANCE[dtype])
    for (name, edited), other in zip(model.named_parameters(), independent.parameters()):
        torch.testing.assert_close(edited, other, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0, msg=name)


@pytest.mark.parametrize("method", ["kdpo", "ftm"])
def test_a_replay_that_holds_adds_nothing(bpe_tokenizer, method):
    config = EditConfig(method=method, lr=1e-3, n_cycles=1, n_steps=3, early_stop=False)
    plain, replayed = tiny_model("llama"), tiny_model("llama")
    edit, held = _request(bpe_tokenizer, 0), _held_request(plain, bpe_tokenizer, 2)
    alone = _edit(plain, *edit, config)
    record = _edit(replayed, *edit, config, replays=[held])
    assert (alone.replays, record.replays) == (0, 1)
    assert record.losses == pytest.approx(alone.losses, abs=1e-6)
    for (name, a), b in zip(plain.named_parameters(), replayed.parameters()):  # Adam: 1e-6 apart where grad ~ 0
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_replay_is_the_paper_edit_unpadded(bpe_tokenizer, dtype):
    """Without replays the edit's forwards get c+y_w as given (the same tensor, no mask, no positions), and
    its losses are those of the per-sequence path."""
    model, independent = tiny_model("llama").to(dtype), tiny_model("llama").to(dtype)
    ids, start = _request(bpe_tokenizer, 0)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    record = _edit(model, ids, start, SHORT)
    assert seen and all("attention_mask" not in keys and "position_ids" not in keys for keys in seen)
    assert EditBatch.of(ids, start).input_ids is ids and EditConfig().replay == 0
    assert record.losses == pytest.approx(_independent_losses(independent, [(ids, start)], SHORT), **TOLERANCE[dtype])
    assert (record.replays, record.replays_kept) == (0, 0)


def test_the_edit_stops_only_once_it_and_all_its_replays_hold(bpe_tokenizer, monkeypatch):
    """An edit the model already holds takes no step alone; with a replay it does not hold, it runs
    cycles until both hold, and stops at the first cycle start where they do."""
    config = EditConfig(lr=1e-2, n_cycles=30, n_steps=4)
    model = tiny_model("llama")
    edit, missed = _held_request(model, bpe_tokenizer, 2), _request(bpe_tokenizer, 1)
    assert _edit(tiny_model("llama"), *edit, config).cycles == 0
    checks = []
    real = EditBatch.held
    monkeypatch.setattr(EditBatch, "held", lambda self, y_l: checks.append(real(self, y_l)) or checks[-1])
    record = _edit(model, *edit, config, replays=[missed])
    assert record.cycles > 0 and record.success and (record.replays, record.replays_kept) == (1, 1)
    assert _holds(model, *edit) and _holds(model, *missed)  # checked apart from the batch
    assert all(not all(held) for held in checks[:record.cycles])
    assert all(checks[record.cycles]) and len(checks) == record.cycles + 2  # the stop, and the record's check


def test_replay_keeps_earlier_edits_better_than_plain_kdpo(bpe_tokenizer):
    """10 sequential edits on a tiny model: after the 10th, the first 9 hold (teacher-forced argmax) far
    more often with 3 replays than without (measured 13 against 1 of 27 over three seeds), and with the 3
    chosen from a pool of all earlier edits, forgotten first (measured 18)."""
    edits = [_request(bpe_tokenizer, i) for i in range(10)]
    kept = {}
    for replay, pool in ((0, 0), (3, 0), (3, 9)):
        kept[replay, pool] = 0
        for seed in range(3):
            model, rehearsal = tiny_model("llama", seed=seed), Rehearsal(seed)
            policy, reference = Policy(model), make_reference("cached")
            config = EditConfig(lr=1e-2, n_cycles=30, n_steps=4, replay=replay, replay_pool=pool)
            for ids, start in edits:
                optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
                replays = rehearsal.sample(replay, pool=pool, policy=policy)
                run_edit(policy, reference, ids, start, config, optimizer, replays=replays)
                rehearsal.add(ids, start)
            kept[replay, pool] += sum(_holds(model, *edit) for edit in edits[:9])
    assert kept[3, 0] >= kept[0, 0] + 6 and kept[3, 9] >= kept[0, 0] + 6, kept


def test_rehearsal_samples_earlier_edits_reproducibly_and_checkpoints_as_data(bpe_tokenizer):
    rehearsal = Rehearsal(seed=7)
    assert rehearsal.sample(3) == []
    edits = [_request(bpe_tokenizer, i) for i in range(6)]
    for ids, start in edits[:5]:
        rehearsal.add(ids, start)
    sample = rehearsal.sample(3, "cpu")
    assert len(sample) == 3 and len({tuple(ids[0].tolist()) for ids, _ in sample}) == 3
    known = {(tuple(ids[0].tolist()), start) for ids, start in edits[:5]}
    assert all((tuple(ids[0].tolist()), start) in known for ids, start in sample)  # only earlier edits
    assert all(ids.shape[0] == 1 and ids.dtype == torch.long for ids, _ in sample)
    assert len(rehearsal.sample(9)) == 5 and rehearsal.sample(0) == []

    state = json.loads(json.dumps(rehearsal.state_dict()))  # plain data
    resumed = Rehearsal()
    resumed.load_state_dict(state)
    assert [(ids.tolist(), s) for ids, s in resumed.sample(3)] == [(ids.tolist(), s) for ids, s in sample]
    rehearsal.add(*edits[5])
    draws = {tuple(tuple(ids[0].tolist()) for ids, _ in rehearsal.sample(3)) for _ in range(3)}
    assert len(draws) == 1  # the same draw for the same position, however often it is asked
    with pytest.raises(ValueError, match="0 or more"):
        rehearsal.sample(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_pool_rehearses_the_edits_the_model_has_forgotten_first(bpe_tokenizer, dtype):
    """`replay_pool`: of 6 earlier edits (3 the model gives, 3 it does not, each checked by a forward of
    it alone), k = 2 taken from a pool of all 6 are both forgotten ones; k = 4 takes the 3 and one kept."""
    model = tiny_model("llama").to(dtype)
    kept_edits = [_held_request(model, bpe_tokenizer, i) for i in range(3)]
    lost_edits = [_request(bpe_tokenizer, i) for i in range(3, 6)]
    assert all(_holds(model, *e) for e in kept_edits) and not any(_holds(model, *e) for e in lost_edits)
    rehearsal, policy = Rehearsal(seed=3), Policy(model)
    for ids, start in [kept_edits[0], lost_edits[0], kept_edits[1], lost_edits[1], kept_edits[2], lost_edits[2]]:
        rehearsal.add(ids, start)
    lost = {tuple(ids[0].tolist()) for ids, _ in lost_edits}
    pool = rehearsal.sample(6, pool=0)
    assert replays_held(policy, pool) == [_holds(model, *e) for e in pool]  # batched = each alone
    two = rehearsal.sample(2, pool=6, policy=policy)
    assert len(two) == 2 and all(tuple(ids[0].tolist()) in lost for ids, _ in two)
    four = [tuple(ids[0].tolist()) for ids, _ in rehearsal.sample(4, pool=6, policy=policy)]
    assert set(four[:3]) == lost and four[3] not in lost
    assert [ids.tolist() for ids, _ in rehearsal.sample(2, pool=6, policy=policy)] == [ids.tolist() for ids, _ in two]
    assert len(rehearsal.sample(2, pool=2)) == 2  # nothing to choose from: no forward, no policy needed
    with pytest.raises(ValueError, match="needs the policy"):
        rehearsal.sample(2, pool=6)


def test_the_editor_rehearses_a_forgotten_edit_from_its_pool(bpe_tokenizer, monkeypatch):
    """`model.edit.replay_pool` wired through KDPOEditor: after 5 edits, the 6th rehearses one the model no
    longer gives, found by forwards of each earlier edit alone (the bare sampler picks a kept one here)."""
    editor = KDPOEditor.from_model(tiny_model("llama"), bpe_tokenizer, lr=1e-2, n_cycles=30, n_steps=4,
                                   replay=1, replay_pool=5)
    seen = []
    run_edit_ = editor_module.run_edit
    monkeypatch.setattr(editor_module, "run_edit", lambda *args: seen.append(args[-1]) or run_edit_(*args))
    edits = [_request(bpe_tokenizer, i) for i in range(6)]
    for ids, start in edits[:5]:
        editor._edit(ids, start, torch.optim.Adam(editor.policy.params.values(), lr=1e-2), torch.Tensor.backward)
    lost = [tuple(ids[0].tolist()) for ids, start in edits[:5] if not _holds(editor.lm, ids, start)]
    assert lost and len(lost) < 5
    editor._edit(*edits[5], torch.optim.Adam(editor.policy.params.values(), lr=1e-2), torch.Tensor.backward)
    assert [len(r) for r in seen] == [0, 1, 1, 1, 1, 1] and tuple(seen[-1][0][0][0].tolist()) in lost
    editor.close()


def test_bad_replay_settings_say_so(bpe_tokenizer):
    with pytest.raises(ValueError, match="replay must be 0 or more"):
        EditConfig(replay=-1)
    with pytest.raises(ValueError, match="replay works with methods"):
        EditConfig(method="dpo", replay=2)
    for replay, pool in ((0, 4), (3, 3)):
        with pytest.raises(ValueError, match="replay_pool chooses"):
            EditConfig(replay=replay, replay_pool=pool)
    ids, start = _request(bpe_tokenizer, 0)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="replay works with methods"):
        _edit(model, ids, start, EditConfig(method="dpo"), replays=[_request(bpe_tokenizer, 1)])
    with pytest.raises(ValueError, match="target_start"):
        EditBatch.of(ids, start, [(ids[0], start)])
    with pytest.raises(ValueError, match="target_start"):
        Rehearsal().add(ids, ids.shape[1])
