"""The model side of the preference stage: per-row log-probabilities (VARGPT.sequence_logps) and the preference
module's step on a pair batch (vargpt.training.preference_module)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_vargpt_model import CONF, TINY_IDS, make_batch

from vargpt.model import build_vargpt, load_model_config
from vargpt.training.preference_module import PreferenceModule, pair_logps

STAGE = OmegaConf.load(CONF.parents[0] / "stage" / "dpo_gen.yaml").stage
TRAINER = OmegaConf.create({"activation_checkpointing": False, "compile": {"enabled": False}, "val_prompt_gain": False})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "tiny.yaml"), TINY_IDS).eval()


def pair_batch(model, pairs: int = 2, seed: int = 0) -> dict:
    """A pair batch as the PairCollator makes it: the chosen rows, then the rejected rows."""
    batch = make_batch(model, n_und=0, n_gen=2 * pairs, seed=seed)
    return {**batch, "pair_size": pairs}


def test_image_logps_sum_the_image_loss_per_row(model):
    batch = make_batch(model, n_und=1, n_gen=2)
    with torch.no_grad():
        sums, counts = model.sequence_logps(batch, "image")
        L = model.num_gen_tokens
        assert counts.tolist() == [0.0, L, L]
        assert sums[0] == 0
        # One row at a time, its image loss (the mean CE over its L codes) is minus its mean log-prob.
        for row in (1, 2):
            one = make_batch(model, n_und=0, n_gen=1)
            one = {k: (v[row : row + 1] if k != "pixel_gen_values" else v[row - 1 : row]) for k, v in batch.items()
                   if v is not None}  # fmt: skip
            loss = model(one).loss_image
            assert (-sums[row] / L).item() == pytest.approx(loss.item(), rel=1e-5)


def test_text_logps_sum_the_labelled_tokens(model):
    batch = make_batch(model, n_und=2, n_gen=1)
    with torch.no_grad():
        sums, counts = model.sequence_logps(batch, "text")
        out = model(batch)
    labelled = (batch["labels"][:, 1:] != -100).sum(1).float()
    assert torch.equal(counts, labelled)
    assert (-sums.sum() / counts.sum()).item() == pytest.approx(out.loss_text.item(), rel=1e-5)


def test_logps_never_drop_the_condition(model):
    batch = make_batch(model, n_und=0, n_gen=4)
    model.train()
    try:
        torch.manual_seed(1)
        a, _ = model.sequence_logps(batch)
        torch.manual_seed(2)
        b, _ = model.sequence_logps(batch)
    finally:
        model.eval()
    assert torch.equal(a, b)


def _module(model, reference=None, **preference) -> PreferenceModule:
    stage = copy.deepcopy(STAGE)
    stage.preference.update(preference)
    return PreferenceModule(copy.deepcopy(model), stage, TRAINER, total_steps=10, seed=0, reference=reference)


def test_policy_equal_to_its_frozen_copy_gives_log_2():
    torch.manual_seed(0)
    fresh = build_vargpt(load_model_config(CONF / "tiny.yaml"), TINY_IDS)
    module = _module(fresh, reference=copy.deepcopy(fresh))
    module.train()  # drop-path and condition dropout must not make policy and reference differ
    out, loss = module._forward(pair_batch(fresh))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.metrics["rewards/margins"].item() == 0.0


def test_frozen_copy_equals_precomputed_reference(model):
    batch = pair_batch(model, pairs=3, seed=4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        ref_B2, _ = pair_logps(reference, batch, "image")
    precomputed = {**batch, "ref_logps": ref_B2.T.reshape(-1)}  # the collator's row order: chosen, then rejected
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.vargpt_gen.head.bias.add_(torch.randn_like(policy.vargpt_gen.head.bias))  # policy != reference
    a = _module(policy, reference=reference)
    b = _module(policy)
    _, loss_a = a._forward(batch)
    _, loss_b = b._forward(precomputed)
    assert loss_a.item() == loss_b.item()
    assert loss_a.item() != pytest.approx(math.log(2))


def test_missing_precomputed_reference_names_the_fix(model):
    with pytest.raises(ValueError, match="reference_logps"):
        _module(model)._forward(pair_batch(model))
