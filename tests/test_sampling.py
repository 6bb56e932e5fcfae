"""Tests of the top-k / top-p filter, the per-sample code picker and the CFG schedule (reference 12.7, 12.8)."""

from __future__ import annotations

import math

import pytest
import torch

from vargpt.model.sampling import cfg_ratio, filter_top_k_top_p, inverse_cdf, pick_codes


def _kept(logits_BlV: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logits_BlV)


def test_cfg_ramp_matches_var() -> None:
    ratios = [cfg_ratio(1.5, k, 10, "ramp") for k in range(10)]
    expected = [0, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1, 7 / 6, 4 / 3, 3 / 2]
    assert ratios == pytest.approx(expected, abs=1e-12)
    assert [cfg_ratio(1.5, k, 10, "constant") for k in range(10)] == [1.5] * 10


def test_cfg_unknown_schedule_names_allowed_values() -> None:
    with pytest.raises(ValueError, match="ramp.*constant"):
        cfg_ratio(1.5, 3, 10, "linear")


def test_top_k_keeps_at_least_k_and_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4096)
    kept = _kept(filter_top_k_top_p(logits, top_k=900))
    assert (kept.sum(-1) == 900).all()
    # Every kept logit is >= every removed one.
    assert (logits.masked_fill(~kept, float("inf")).amin(-1) >= logits.masked_fill(kept, float("-inf")).amax(-1)).all()

    tied = torch.tensor([[[3.0, 2.0, 2.0, 2.0, 1.0]]])  # the 2nd largest is tied three times
    assert _kept(filter_top_k_top_p(tied, top_k=2)).sum() == 4


def test_top_p_keeps_smallest_set_with_mass_above_p() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 5, 64) * 2
    for top_p in (0.3, 0.7, 0.9, 0.96):
        kept = _kept(filter_top_k_top_p(logits, top_p=top_p))
        probs = logits.double().softmax(-1)
        desc_probs, desc_idx = probs.sort(-1, descending=True)
        # n = 1 + number of leading tokens whose cumulative mass is still <= p.
        n_needed = (desc_probs.cumsum(-1) <= top_p).sum(-1) + 1
        for b in range(4):
            for i in range(5):
                expected = set(desc_idx[b, i, : n_needed[b, i]].tolist())
                assert set(kept[b, i].nonzero().flatten().tolist()) == expected
                assert probs[b, i][kept[b, i]].sum() > top_p


def test_argmax_always_survives() -> None:
    logits = torch.tensor([[[0.0, 0.01, 0.02, 0.03]]])  # near uniform: max prob < 1 - top_p
    kept = _kept(filter_top_k_top_p(logits, top_k=3, top_p=1e-4))
    assert kept.flatten().tolist() == [False, False, False, True]


def test_top_k_after_top_p_combination() -> None:
    logits = torch.log(torch.tensor([[[0.4, 0.3, 0.2, 0.1]]]))
    # top-k=3 drops 0.1; top-p=0.5 on the renormalised (4/9, 3/9, 2/9) keeps the two most likely.
    assert _kept(filter_top_k_top_p(logits, top_k=3, top_p=0.5)).flatten().tolist() == [True, True, False, False]


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_top_k_1_is_argmax_draws_nothing_and_input_untouched() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 7, 50)
    before = logits.clone()
    generators = _generators(0, 1, 2)
    states = [g.get_state() for g in generators]
    for _ in range(3):
        assert torch.equal(pick_codes(logits, 1, 0.96, generators), logits.argmax(-1))
    assert torch.equal(logits, before)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states, strict=True))


def test_samples_stay_inside_the_kept_set() -> None:
    logits = torch.tensor([[[5.0, 4.9, 0.0, -1.0, -2.0]]]).expand(1, 2000, 5)
    idx = pick_codes(logits, 2, 0.0, _generators(0))
    assert set(idx.unique().tolist()) == {0, 1}


def test_each_sample_draws_from_its_own_generator() -> None:
    """Sample i's codes depend on its generator only: the same as drawn alone, whatever else is in the batch."""
    torch.manual_seed(4)
    logits = torch.randn(3, 30, 100)
    batched = pick_codes(logits, 50, 0.9, _generators(7, 8, 9))
    alone = [pick_codes(logits[i : i + 1], 50, 0.9, _generators(seed)) for i, seed in enumerate((7, 8, 9))]
    assert torch.equal(batched, torch.cat(alone))
    assert not torch.equal(batched, pick_codes(logits, 50, 0.9, _generators(7, 8, 10)))
    assert batched.shape == (3, 30) and batched.dtype == torch.long


def test_inverse_cdf_takes_the_first_index_past_u() -> None:
    """The first index whose cumulative mass exceeds u (a zero-mass index is never picked); u scales the total."""
    probs_11V = torch.tensor([[[0.25, 0.0, 0.5, 0.25]]])
    picks = [inverse_cdf(probs_11V, torch.tensor([[u]])).item() for u in (0.0, 0.25, 0.5, 0.75, 0.99)]
    assert picks == [0, 2, 2, 3, 3]
    assert inverse_cdf(2 * probs_11V, torch.tensor([[0.5]])).item() == 2


def test_sampling_frequencies_follow_filtered_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4).expand(1, 20000, 4)
    idx = pick_codes(logits, 0, 0.7, _generators(0))
    freq = torch.bincount(idx.flatten(), minlength=4).double() / idx.numel()
    assert freq[2:].sum() == 0
    assert math.isclose(freq[0].item(), 0.5 / 0.8, abs_tol=0.02)
