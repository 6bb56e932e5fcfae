"""The training forward reads no device value (no host-device sync) when the batch carries its BatchCounts, and
its results are those of the plain formulation (boolean-mask gathers, transformers' own attention mask).

``torch.cuda.set_sync_debug_mode`` needs a GPU (the ``gpu`` test below). On a CPU the check uses fake tensors:
they have shapes but no values, so any op whose result the host must read (``.item()``, ``bool()``, a
boolean-mask gather, ``nonzero``) raises under FakeTensorMode, while the same forward with its counts given
runs through, backward included.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from test_vargpt_model import CONF, IGNORE_INDEX, TINY_IDS, make_batch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from vargpt.model import ScaleSchedule, build_vargpt, load_model_config
from vargpt.model.vargpt import HOST_COUNTS, BatchCounts

DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "tiny.yaml"), TINY_IDS)


def with_counts(model, batch: dict) -> dict:
    """As VARGPTModule hands a batch to the model: its counts taken on the host copy."""
    return {**batch, HOST_COUNTS: BatchCounts.of(batch, model.ids)}


def reference_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image CE the plain way: transformers' 2-D padding mask, boolean-mask gathers (both sync)."""
    ids_BT, labels_BT = batch["input_ids"], batch["labels"]
    feats = model.image_features(batch["pixel_values"])
    codes = model.gen_targets(batch)
    x_BLC, cond_BD = model.gen_inputs(codes)
    embeds = model.build_inputs_embeds(ids_BT, feats, model.image_gen_projector(x_BLC))
    hidden_BTH = model.language_model.model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    keep_BT = labels_BT[:, 1:] != IGNORE_INDEX
    logits_NV = model.language_model.lm_head(hidden_BTH[:, :-1][keep_BT]).float()
    text = F.cross_entropy(logits_NV, labels_BT[:, 1:][keep_BT])
    hidden_NLH = hidden_BTH[ids_BT == model.ids.gen_pad].view(-1, model.num_gen_tokens, hidden_BTH.shape[-1])
    logits_NLV = model.decode_image_logits(hidden_NLH, cond_BD)
    image = F.cross_entropy(logits_NLV.float().transpose(1, 2), torch.cat(codes, dim=1), reduction="none").mean()
    return text, image


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_results_equal_the_plain_formulation(tiny):
    """Losses and every gradient are bitwise those of the plain formulation (a padded mixed batch)."""
    model = tiny.eval()  # no condition dropout: both passes see the same condition
    batch = make_batch(model, n_und=2, n_gen=2)
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    model.zero_grad(set_to_none=True)
    out = model(with_counts(model, batch))
    out.loss.backward()
    ours = grads(model)
    model.zero_grad(set_to_none=True)
    text, image = reference_losses(model, batch)
    (text + image).backward()
    assert torch.equal(out.loss_text, text) and torch.equal(out.loss_image, image)
    reference = grads(model)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[n], reference[n]) for n in ours)


def test_unpadded_batch_matches_within_rounding(tiny):
    """Without padding transformers would skip the mask (SDPA's is_causal); the explicit causal mask takes
    another kernel, equal up to float rounding."""
    model = tiny.eval()
    batch = make_batch(model, n_und=1, n_gen=0)
    n = int(batch["attention_mask"].sum())
    full = {k: v[:, :n] if k in ("input_ids", "attention_mask", "labels") else v for k, v in batch.items()}
    assert bool(full["attention_mask"].all())
    with torch.no_grad():
        embeds = model.build_inputs_embeds(full["input_ids"], model.image_features(full["pixel_values"]), None)
        ours = model.llm_hidden(embeds, full["attention_mask"])
        plain = model.language_model.model(
            inputs_embeds=embeds, attention_mask=full["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture
def host_phi_index(monkeypatch):
    """ScaleSchedule.phi_index reads a small CPU tensor it makes itself (host work, never a device sync);
    under fake tensors it would raise, so it is answered from values computed beforehand."""
    monkeypatch.setattr(ScaleSchedule, "phi_index", functools.cache(ScaleSchedule.phi_index))


@pytest.mark.parametrize("codes", [False, True], ids=["pixels", "codes"])
def test_forward_and_backward_read_no_device_value(tiny, host_phi_index, codes):
    model = tiny.train()
    batch = make_batch(model, n_und=2, n_gen=2, seed=3)
    if codes:
        batch = {
            **batch,
            "pixel_gen_values": None,
            "gen_codes": torch.cat(model.vae_local.img_to_codes(batch["pixel_gen_values"]), 1),
        }
    model(batch)  # fills the phi_index cache
    counts = BatchCounts.of(batch, model.ids)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the weights take part as they are
    fake = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
    with mode:
        out = model({**fake, HOST_COUNTS: counts})
        out.loss.backward()
        # Without the counts the model has to count on the device: the check would catch it.
        with pytest.raises(DATA_DEPENDENT):
            model(fake)
    model.zero_grad(set_to_none=True)


@pytest.mark.gpu
def test_no_sync_on_cuda(tiny):
    """The same on a GPU, with CUDA's own detector: forward and backward of a mixed batch, counts given."""
    model = build_vargpt(tiny.cfg, TINY_IDS).cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_batch(model, n_und=2, n_gen=2).items()}
    batch[HOST_COUNTS] = BatchCounts.of({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}, model.ids)
    model(batch).loss.backward()  # warm-up: lazy CUDA initialisation synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(batch).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
