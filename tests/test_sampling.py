"""The nucleus sampler behind the unrelated questions (decoding.py, used by questions.py): the
tokens it may pick, how often, and that decoding rows together from a shared prompt cache picks
what decoding each row alone, without a cache, picks."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from editcomp.device import seeded
from editcomp.decoding import nucleus_pick, sample_continuations
from editcomp.tiny import tiny_model


def test_nucleus_pick_draws_the_top_p_set_in_proportion_to_its_probabilities():
    torch.manual_seed(0)
    logits = torch.stack([torch.randn(300) * 2, torch.randn(300) * 8, torch.zeros(300)])
    probs = torch.softmax(logits, -1)
    kept = TopPLogitsWarper(0.9)(None, logits.clone()).isfinite()
    u = torch.arange(200_000, dtype=torch.float64) / 200_000
    for row in range(3):
        # first_k=8 is smaller than every row's nucleus but the peaked one's: the search widens
        picks = nucleus_pick(probs[row].expand(len(u), -1), 0.9, u, first_k=8)
        counts = torch.bincount(picks, minlength=300).double() / len(u)
        if row == 2:  # all tied: which 270 of the 300 is arbitrary, that 270 are kept is not
            assert int((counts > 0).sum()) == int(kept[row].sum()) == 270
            kept[row] = counts > 0
        assert torch.equal(counts > 0, kept[row])
        nucleus = probs[row].double() * kept[row]
        torch.testing.assert_close(counts, nucleus / nucleus.sum(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rows_sampled_together_from_a_shared_prompt_cache_match_each_row_decoded_alone(family):
    model = tiny_model(family)  # gemma3: a sliding window of 8 tokens, shorter than these rows
    prompt = torch.tensor([[1, 17, 93, 250, 41, 7]])
    stop, n, steps, top_p = list(range(40, 90)), 6, 12, 0.8
    with seeded(3, "cpu"):
        together = sample_continuations(model, prompt, n, steps, stop, top_p)
    alone: list[list[int]] = [[] for _ in range(n)]
    with seeded(3, "cpu"), torch.no_grad():
        going = list(range(n))
        for _ in range(steps):
            u = torch.rand(n)
            for r in going:
                ids = torch.tensor([prompt[0].tolist() + alone[r]])
                probs = torch.softmax(model(ids).logits[:, -1].float(), -1)
                alone[r].append(int(nucleus_pick(probs, top_p, u[r:r + 1])))
            going = [r for r in going if alone[r][-1] not in stop]
            if not going:
                break
    assert together == alone
    lengths = {len(s) for s in together}
    assert len(lengths) > 1 and min(lengths) < steps  # rows stopped at different steps
    assert all(s[-1] in stop for s in together if len(s) < steps)
