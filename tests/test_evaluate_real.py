"""The real SmolLM2-135M: the fast paths equal brute force, and its super weight matters."""
from __future__ import annotations

import pytest
import torch

from sw_lib.ablate import WeightEdit
from sw_lib.evaluate import forward, perplexity, run_task

SUPER_WEIGHT = WeightEdit(layer=11, row=507, column=1229)  # largest spike pair of SmolLM2-135M

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On this shared 2-core machine one thread beats two by 5-10x (OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def test_real_model_mc_and_perplexity_equal_plain_forward(smol, tmp_path):
    from test_evaluate_mc import assert_matches, brute_force

    assert forward.fast_path_ok(smol.model)
    for task, n in (("hellaswag", 3), ("mmlu", 3)):
        result = run_task(smol, task, n, cache=False, batch_size=3, progress=False)
        metrics = ("acc",) if task == "mmlu" else ("acc", "acc_norm")
        assert_matches(result, brute_force(smol, task, n), metrics)

    ppl = perplexity(smol, seq_len=256, n_windows=2, cache=tmp_path, progress=False)
    from sw_lib.evaluate.perplexity import tokens_of

    tokens = tokens_of(smol.tokenizer, None, "bundled")
    for w, nll in zip(ppl["windows"], ppl["per_window_nll"]):
        ids = torch.tensor([tokens[w * 256:(w + 1) * 256]])
        assert nll == pytest.approx(smol.model(ids, labels=ids).loss.item() * 255, rel=1e-4)
    assert 10 < ppl["perplexity"] < 100

    # Zeroing the super weight multiplies perplexity several times over; restored afterwards.
    zeroed = perplexity(smol, [SUPER_WEIGHT], seq_len=256, n_windows=2, cache=tmp_path,
                        progress=False)
    assert zeroed["perplexity"] > 3 * ppl["perplexity"]
    again = perplexity(smol, seq_len=256, n_windows=2, cache=False, progress=False)
    assert again["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-6)


@torch.no_grad()
def test_real_model_gsm8k_equals_generate_one_prompt_at_a_time(smol):
    """Batched cached generation gives the text of transformers' generate, one prompt at a
    time, with the stop strings checked by generate (lm-eval's batch-1 computation)."""
    from sw_lib import data
    from sw_lib.evaluate import TASKS, generation
    from sw_lib.evaluate.engine import build_requests

    spec = TASKS["gsm8k"]
    result = run_task(smol, "gsm8k", 4, cache=False, progress=False)
    requests = build_requests(spec, data.select_items(spec.split, 4).items, spec.default_shots)
    stops = list(spec.until) + [smol.tokenizer.eos_token]
    for request, item in zip(requests, result["per_item"]):
        ids = torch.tensor([smol.tokenizer.encode(request.context)])
        out = smol.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=spec.max_gen_toks, do_sample=False,
                                  stop_strings=stops, tokenizer=smol.tokenizer,
                                  pad_token_id=smol.tokenizer.pad_token_id, temperature=None,
                                  top_p=None, top_k=None)
        text = smol.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert item["generation"] == generation.truncate_at_stops(text, stops)
