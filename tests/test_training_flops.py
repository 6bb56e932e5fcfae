"""The FLOP count behind MFU (vargpt.training.flops) against torch's FlopCounterMode, which counts the matmuls
and convolutions that actually run, and the count's rules: 6N / 4N / 2N per stage, padding is no work, AdaLN
per image, additive shapes.

Tolerance: zero once the known differences are taken off. The forward weight terms agree exactly, part by
part, when the count is given the tokens the model runs on (padding included) instead of the useful ones; so
does the backward total. By design the two differ in
(a) padding: the counter counts it as LLM work, MFU does not;
(b) attention: the counter does not see the fused CPU SDPA kernels at all (on a GPU it would count the full
    T x T products, masked pairs included), the count has the pairs the masks allow;
(c) the VQ-VAE convolutions that turn codes into the VAR teacher input: a tokenizer, not in MFU;
(d) input gradients of layers whose input needs none, which autograd skips and the rule counts (the VAR
    ``word_embed`` on the teacher input, the projector on frozen vision features, AdaLN on a frozen
    condition): at most 0.2 % of a tiny step's backward (stage 2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_vargpt_model import TINY_IDS, make_batch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vargpt.model import build_var, build_vargpt, load_model_config
from vargpt.training.flops import (
    VARGPT_PARTS,
    BatchShape,
    VARFlops,
    VARGPTFlops,
    block_causal_pairs,
    causal_pairs,
    token_counts,
)
from vargpt.training.stage import apply_stage

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), TINY_IDS).train()


def set_stage(model: nn.Module, name: str) -> None:
    apply_stage(model, dict(OmegaConf.load(CONF / "stage" / f"{name}.yaml").stage.trainable), name)


def attention_fwd(count: VARGPTFlops, shape: BatchShape) -> dict[str, float]:
    """The attention terms of the count's forward, per part (the counter does not see CPU SDPA)."""
    vis = count.P + 1
    return {
        "vision_tower": 4.0 * count.vis_layers * count.vis_dim * vis**2 * shape.num_und_images,
        "language_model": 4.0 * count.llm_layers * count.llm_attn_dim * shape.llm_pairs,
        "var_blocks": 4.0 * count.var_layers * count.var_dim * count.var_pairs * shape.num_gen_images,
    }


def counter_by_part(counts: dict[str, dict]) -> dict[str, float]:
    """FlopCounterMode's per-module counts summed per VARGPT part (modules outside every part: per top-level
    sub-module name), each module counted once: the outermost called ones (a count includes the children's)."""
    names = [k.removeprefix("VARGPT.") for k in counts if k.startswith("VARGPT.")]
    outermost = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    out: dict[str, float] = {}
    for name in outermost:
        under = [(len(p), part) for part, spec in VARGPT_PARTS.items() for p in spec.prefixes if _under(name, p)]
        part = max(under)[1] if under else name.split(".")[0]
        out[part] = out.get(part, 0.0) + sum(counts[f"VARGPT.{name}"].values())
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def skipped_input_grads(model: nn.Module, count: VARGPTFlops, shape: BatchShape) -> float:
    """(d): input gradients the rule counts (a gradient flows through the part) and autograd skips (that
    layer's input needs none): the VAR ``word_embed`` on the teacher input; the understanding projector's first
    layer on the frozen vision tower's features; the AdaLN projections on the condition when the class
    embedding is frozen (it is the condition's only source)."""
    skipped = 0.0
    n_gen = shape.num_gen_images
    if count.m.grad_flows["multi_modal_projector"] and not count.m.grad_flows["vision_tower"]:
        first = model.multi_modal_projector.linear_1.weight.numel()
        skipped += 2.0 * first * shape.num_und_images * count.P
    if count.m.grad_flows["var_embed"]:
        skipped += 2.0 * model.vargpt_gen.word_embed.weight.numel() * n_gen * (count.L - count.first_l)
    if count.m.grad_flows["var_blocks"] and not model.vargpt_gen.class_emb.weight.requires_grad:
        skipped += 2.0 * count.m.weights["var_blocks"].per_sample * n_gen
    return skipped


@pytest.mark.parametrize("stage", ["pretrain", "sft_mixed", "sft_gen"])
def test_step_count_matches_torch_flop_counter(tiny, stage):
    """One training step (forward + backward) of the tiny model on a padded mixed batch."""
    set_stage(tiny, stage)
    batch = make_batch(tiny, n_und=2, n_gen=2)
    codes = torch.cat(tiny.vae_local.img_to_codes(batch["pixel_gen_values"]), dim=1)
    batch = dict(batch, pixel_gen_values=None, gen_codes=codes)
    tiny.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, depth=None) as fwd_counter:
        out = tiny(batch)
    with FlopCounterMode(display=False) as bwd_counter:
        out.loss.backward()

    count = VARGPTFlops(tiny)
    shape = BatchShape.from_batch(batch)
    assert shape.padded_tokens > shape.real_tokens  # the batch has padding
    useful = count(shape)
    # What the model runs: every padded token through the LLM; attention taken off (not seen by the counter).
    as_run_shape = dataclasses.replace(shape, real_tokens=shape.padded_tokens)
    as_run, attn = count(as_run_shape), attention_fwd(count, as_run_shape)
    measured = counter_by_part(fwd_counter.get_flop_counts())

    vision = measured.pop("vision_patch", 0.0) + measured.pop("vision_tower", 0.0)
    expected_vision = as_run.parts["vision_patch"][0] + as_run.parts["vision_tower"][0] - attn["vision_tower"]
    assert vision == expected_vision
    # (c): what else ran forward is the VQ-VAE (its phi convolutions: codes -> teacher input), not in MFU.
    assert measured.pop("vae_local") > 0 and set(measured) <= set(VARGPT_PARTS)
    for part, flops in measured.items():
        assert flops == as_run.parts[part][0] - attn.get(part, 0.0), part

    # Backward: attention doubled where a gradient flows, less (d) the input gradients autograd skips.
    attn_bwd = sum(2.0 * attn[p] for p in attn if count.m.grad_flows[p])
    assert bwd_counter.get_total_flops() == as_run.backward - attn_bwd - skipped_input_grads(tiny, count, shape)
    # (a): the useful count is the as-run count less the padding's LLM work.
    assert useful.total < as_run.total


def test_padding_is_not_work(tiny):
    """The same rows padded to a longer T count the same FLOPs (the counter would count the padding)."""
    set_stage(tiny, "sft_mixed")
    batch = make_batch(tiny, n_und=1, n_gen=1)
    pad = torch.nn.functional.pad
    wider = dict(
        batch,
        input_ids=pad(batch["input_ids"], (0, 16), value=tiny.ids.pad),
        attention_mask=pad(batch["attention_mask"], (0, 16)),
        labels=pad(batch["labels"], (0, 16), value=-100),
    )
    count = VARGPTFlops(tiny)
    assert count(wider).total == count(batch).total
    assert BatchShape.from_batch(wider).padded_tokens == BatchShape.from_batch(batch).padded_tokens + 32


def test_shapes_add_up(tiny):
    """The count of summed shapes is the sum of the counts (what the throughput monitor relies on)."""
    set_stage(tiny, "sft_gen")
    a, b = make_batch(tiny, n_und=1, n_gen=0, seed=1), make_batch(tiny, n_und=0, n_gen=2, seed=2)
    count = VARGPTFlops(tiny)
    sa, sb = BatchShape.from_batch(a), BatchShape.from_batch(b)
    assert count(sa + sb).total == pytest.approx(count(sa).total + count(sb).total, rel=1e-12)
    lengths = a["attention_mask"].sum(1).tolist()
    assert token_counts(a).tolist() == [
        sum(lengths),
        sum(causal_pairs(n) for n in lengths),
        int((a["labels"][:, 1:] != -100).sum()),
    ]
    assert BatchShape.sizes(a) == dataclasses.replace(sa, real_tokens=0, llm_pairs=0, num_labels=0)


def test_adaln_counts_per_image(tiny):
    """VAR's AdaLN projections act on the condition (one vector per image), not on each of the L tokens."""
    set_stage(tiny, "sft_gen")
    weights = VARGPTFlops(tiny).m.weights["var_blocks"]
    ada = sum(
        m.weight.numel()
        for n, m in tiny.vargpt_gen.named_modules()
        if isinstance(m, nn.Linear) and "ada_lin" in n.split(".")
    )
    assert weights.per_sample == ada > 0
    one, two = (BatchShape(num_gen_images=n) for n in (1, 2))
    fwd1, fwd2 = (VARGPTFlops(tiny)(s).parts["var_blocks"][0] for s in (one, two))
    assert fwd2 == 2 * fwd1  # per image: tokens and condition scale together


def test_var_flops_match_torch_counter():
    """Weight FLOPs of the VAR step equal FlopCounterMode's count: forward exactly; backward up to the input
    gradient of the first layer (autograd skips it: the teacher input needs none). Attention is left out of
    this comparison (on a CPU the counter does not see the fused SDPA kernel)."""
    torch.manual_seed(0)
    var = build_var(2, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3), embed_dim=32, num_heads=2).train()
    var.cond_drop_rate = 0.0
    B = 3
    count = VARFlops(var)
    attn = 4.0 * count.layers * count.dim * count.pairs * B
    fwd_weights = count(B, backward=False).forward - attn
    teacher = torch.randn(B, var.L - var.first_l, var.Cvae)
    with FlopCounterMode(display=False) as fc:
        logits = var(torch.zeros(B, dtype=torch.long), teacher)
    assert fc.get_total_flops() == fwd_weights
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    bwd_weights = count(B).backward - 2 * attn
    first_layer_input_grad = 2.0 * var.word_embed.weight.numel() * B * (var.L - var.first_l)
    assert fc.get_total_flops() == bwd_weights - first_layer_input_grad
    assert block_causal_pairs((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 286_434


def test_vargpt_flops_follow_the_stage(tiny):
    """Frozen parts on the gradient path cost 4N, trained ones 6N, frozen ones off it 2N."""
    shape = BatchShape(
        samples=2,
        padded_tokens=208,
        real_tokens=160,
        llm_pairs=causal_pairs(100) + causal_pairs(60),
        num_labels=20,
        num_und_images=1,
        num_gen_images=1,
    )
    stages = {}
    for name in ("pretrain", "sft_mixed", "sft_gen"):
        set_stage(tiny, name)
        stages[name] = VARGPTFlops(tiny)(shape).parts
    lm_fwd, lm_bwd = stages["sft_mixed"]["language_model"]
    attn = 4.0 * 4 * 128 * (100 * 101 // 2 + 60 * 61 // 2)
    assert lm_bwd - 2 * attn == pytest.approx(2 * (lm_fwd - attn))  # trained: 6N
    lm_fwd3, lm_bwd3 = stages["sft_gen"]["language_model"]
    assert lm_fwd3 == lm_fwd and lm_bwd3 - 2 * attn == pytest.approx(lm_fwd - attn)  # frozen, grad flows: 4N
    vis_fwd, vis_bwd = stages["sft_gen"]["vision_tower"]
    assert vis_fwd > 0 and vis_bwd == 0  # frozen, nothing upstream trains: 2N
