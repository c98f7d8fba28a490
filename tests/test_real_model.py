"""A real pretrained model (SmolLM2-135M-Instruct): KDPO flips its greedy answer to the target."""
import pytest
import torch
from conftest import DEMO_ZSRE

from kdpo_lightning.data import load_requests
from kdpo_lightning.models import load_model
from kdpo_lightning.module import KDPOEditor

pytestmark = pytest.mark.real_model


def _predicts_target(editor, request) -> bool:
    """Is the teacher-forced greedy prediction at every target position the target token?"""
    encoded = editor.encode(request)
    with torch.no_grad():
        logits = editor.lm(input_ids=torch.tensor([encoded.input_ids])).logits[0]
    return logits[encoded.target_start - 1 : -1].argmax(-1).tolist() == list(encoded.target_ids)


def test_kdpo_flips_the_teacher_forced_prediction(smollm_cache):
    model, tokenizer = load_model("smollm2-135m", cache_dir=str(smollm_cache), dtype="float32", device="cpu")
    editor = KDPOEditor.from_model(model, tokenizer, layer=20)  # the paper's protocol: lr 1e-4, 10 x 8 steps
    candidates = load_requests(DEMO_ZSRE)[:20]
    requests = [r for r in candidates if not _predicts_target(editor, r)][:2]
    assert len(requests) == 2
    for request in requests:
        record = editor.edit(request)
        assert record.success and _predicts_target(editor, request), (request.prompt, request.target_new, record)
        assert 0 < record.cycles <= 10 and record.steps == 8 * record.cycles


@pytest.mark.slow
def test_bf16_edits_succeed_like_fp32(smollm_cache):
    """Issue 12: SmolLM2 in bf16, the first 5 ZsRE requests, layer 20, paper settings: 4 or more succeed
    (fp32 makes 4 of these 5; without fp32 master values bf16 made none). `bench/precision.py` times it."""
    model, tokenizer = load_model("smollm2-135m", cache_dir=str(smollm_cache), dtype="bfloat16", device="cpu")
    editor = KDPOEditor.from_model(model, tokenizer, layer=20)
    records = [editor.edit(request) for request in load_requests("demo/zsre")[:5]]
    assert sum(r.success for r in records) >= 4, [(r.success, r.last_loss) for r in records]
