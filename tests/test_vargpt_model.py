"""The unified VARGPT model: released layout, token slots, losses, mixed batches, and that it can learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vargpt.model import SpecialTokenIds, build_vargpt, load_model_config
from vargpt.model.vargpt import IGNORE_INDEX

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# The released tokenizer's ids (VARGPT-REFERENCE.md 1.3).
RELEASED_IDS = SpecialTokenIds(image=32000, pad=32001, gen_start=32002, gen_end=32003, gen_pad=32004, eos=2, bos=1)
# A small id layout for the tiny model: specials first, then "words" 10..99.
TINY_IDS = SpecialTokenIds(image=3, pad=4, gen_start=5, gen_end=6, gen_pad=7, eos=2, bos=1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "tiny.yaml"), TINY_IDS)


def make_batch(model, n_und: int = 1, n_gen: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch: understanding rows ``words <image>*P words </s>``, generation rows
    ``words <gen_start> <gen_pad>*L <gen_end> </s>``; labels on the reply part only (as the collator does)."""
    g = torch.Generator().manual_seed(seed)
    ids, P, L = model.ids, model.num_image_tokens, model.num_gen_tokens
    rows, labels = [], []
    for _ in range(n_und):
        prompt = torch.randint(10, 100, (5,), generator=g).tolist()
        reply = torch.randint(10, 100, (3,), generator=g).tolist() + [ids.eos]
        row = prompt[:2] + [ids.image] * P + prompt[2:] + reply
        rows.append(row)
        labels.append([IGNORE_INDEX] * (len(row) - len(reply)) + reply)
    for _ in range(n_gen):
        prompt = torch.randint(10, 100, (6,), generator=g).tolist()
        reply = torch.randint(10, 100, (2,), generator=g).tolist()
        block = [ids.gen_start] + [ids.gen_pad] * L + [ids.gen_end, ids.eos]
        row = prompt + reply + block
        rows.append(row)
        lab = [IGNORE_INDEX] * len(prompt) + reply + [ids.gen_start] + [IGNORE_INDEX] * L + [ids.gen_end, ids.eos]
        labels.append(lab)
    T = max(len(r) for r in rows)
    T = (T + 7) // 8 * 8
    input_ids = torch.full((len(rows), T), ids.pad)
    lab_t = torch.full((len(rows), T), IGNORE_INDEX)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        lab_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    S, R = model.cfg.vision.image_size, model.cfg.vqvae.image_size
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": lab_t}
    batch["pixel_values"] = torch.randn(n_und, 3, S, S, generator=g) if n_und else None
    batch["pixel_gen_values"] = (torch.rand(n_gen, 3, R, R, generator=g) * 2 - 1) if n_gen else None
    return batch


def test_released_layout_matches_reference_on_meta(reference_lists):
    """Keys and shapes of the 7B config equal the released VARGPT_LLaVA-v1 state dict; counts match."""
    ref = reference_lists("vargpt_llava_v1")
    cfg = load_model_config(CONF / "vargpt_llava_7b.yaml")
    with torch.device("meta"):
        model = build_vargpt(cfg, RELEASED_IDS)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(ref)) == []
    assert sorted(set(ref) - set(ours)) == []
    assert {k: s for k, s in ours.items() if ref[k][0] != s} == {}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 9_278_137_863
    n_var = sum(p.numel() for p in model.vargpt_gen.parameters())
    assert 2.0e9 < n_var < 2.1e9
    assert model.num_gen_tokens == 680 and model.num_image_tokens == 576


def test_tiny_size(tiny_model):
    """The embedded default is "a few million parameters" (its step time is measured in bench/, not here)."""
    n = sum(p.numel() for p in tiny_model.parameters())
    assert 1e6 < n < 20e6, n


def test_mixed_batch_scatters_both_and_trains_both(tiny_model):
    """Understanding and generation samples in one batch: both feature kinds reach the LLM."""
    model = tiny_model.train()
    model.zero_grad(set_to_none=True)
    batch = make_batch(model, n_und=1, n_gen=1)
    out = model(batch)
    assert out.loss_text is not None and out.loss_image is not None
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.image_gen_projector.mlp[0].weight.grad.abs().sum() > 0
    assert model.image_gen_projector_out.mlp[0].weight.grad.abs().sum() > 0
    assert model.image_gen_projector.ln_q.weight.grad is None  # released but unused
    for k in range(model.vargpt_gen.schedule.num_scales):
        assert f"loss_image_s{k}" in out.metrics
    assert "loss_image_tail" in out.metrics and "acc_text" in out.metrics


def test_image_loss_reduction_token_or_scale(tiny_model):
    """token: mean over the L code positions (VAR); scale: mean of the K per-scale means; same logits."""
    from vargpt.model.config import ImageLossReduction

    model = tiny_model.eval()
    batch = make_batch(model, n_und=0, n_gen=2)
    with torch.no_grad():
        token = model(batch)
        model.cfg.image_loss_reduction = ImageLossReduction.scale
        try:
            scale = model(batch)
        finally:
            model.cfg.image_loss_reduction = ImageLossReduction.token
    K = model.vargpt_gen.schedule.num_scales
    per_scale = torch.stack([token.metrics[f"loss_image_s{k}"] for k in range(K)])
    sizes = torch.tensor([float(e - b) for b, e in model.vargpt_gen.schedule.begin_end])
    assert torch.allclose(token.loss_image, (per_scale * sizes).sum() / sizes.sum(), atol=1e-5)
    assert torch.allclose(scale.loss_image, per_scale.mean(), atol=1e-5)
    assert not torch.allclose(scale.loss_image, token.loss_image)


def test_image_loss_reduction_names_the_allowed_values():
    from omegaconf.errors import ValidationError

    with pytest.raises(ValidationError, match="token, scale"):
        load_model_config(CONF / "tiny.yaml", ["image_loss_reduction=tokens"])


def test_generation_inputs_change_text_hidden_states(tiny_model):
    """The gen-pad slots hold projected VAR inputs, not pad embeddings: changing the target image changes
    the LLM states after the block (in a mixed batch, which the release gets wrong)."""
    model = tiny_model.eval()
    batch = make_batch(model, n_und=1, n_gen=1)
    other = dict(batch, pixel_gen_values=-batch["pixel_gen_values"])
    with torch.no_grad():
        a, b = model(batch), model(other)
    assert not torch.allclose(a.metrics["loss_text"], b.metrics["loss_text"])


def test_text_loss_uses_only_labelled_positions(tiny_model):
    """Changing a token's label to ignored removes it from the loss; changing an unlabelled prompt target
    does not change the loss (prompts are never CE targets)."""
    model = tiny_model.eval()
    batch = make_batch(model, n_und=1, n_gen=0)
    with torch.no_grad():
        base = model(batch).metrics["num_text_tokens"]
        masked = dict(batch, labels=batch["labels"].clone())
        first = (masked["labels"][0] != IGNORE_INDEX).nonzero()[0, 0]
        masked["labels"][0, first] = IGNORE_INDEX
        assert model(masked).metrics["num_text_tokens"] == base - 1


def test_slot_count_mismatch_is_a_clear_error(tiny_model):
    batch = make_batch(tiny_model, n_und=1, n_gen=0)
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="<image>"):
        tiny_model(batch)


def test_precomputed_codes_equal_pixels(tiny_model):
    model = tiny_model.eval()
    batch = make_batch(model, n_und=0, n_gen=2)
    codes = torch.cat(model.vae_local.img_to_codes(batch["pixel_gen_values"]), dim=1)
    with torch.no_grad():
        a = model(batch).loss
        b = model(dict(batch, pixel_gen_values=None, gen_codes=codes)).loss
    torch.testing.assert_close(a, b)


def test_overfits_one_mixed_batch():
    """Loss on one tiny mixed batch falls by at least 90 % within a few hundred CPU steps."""
    torch.manual_seed(0)
    cfg = load_model_config(CONF / "tiny.yaml", ["var.cond_drop_rate=0.0"])
    model = build_vargpt(cfg, TINY_IDS).train()
    batch = make_batch(model, n_und=1, n_gen=1, seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    first = None
    for _ in range(300):
        loss = model(batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1 * first:
            break
    assert loss.item() < 0.1 * first, (first, loss.item())
