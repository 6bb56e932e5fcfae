"""Tests of the VAR decoder: checkpoint conformance, block-causal mask, KV cache, reference math, sampling.

Real sizes are built on the meta device only; everything that computes uses a tiny VAR (patch_nums (1, 2, 3),
width 32) on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_lists import load_reference
from torch import nn

from vargpt.model.var import VAR, build_var
from vargpt.model.var_blocks import AdaLNSelfAttn, VARKVCache
from vargpt.model.vqvae import VQVAE

# Parameter counts (buffers excluded) from the headers of shared/reference/var_d*.state_dict.txt.
RELEASED_PARAMS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}
TINY_PATCH_NUMS = (1, 2, 3)
TINY = dict(embed_dim=32, num_heads=4, num_classes=5, vocab_size=16, z_channels=4, patch_nums=TINY_PATCH_NUMS)


def _state_dict_layout(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


def tiny_var(depth: int = 2, seed: int = 0, drop_path_rate: float = 0.0, **kwargs) -> VAR:
    """A tiny VAR whose blocks and head are far from identity (gamma and head scales 1, not 1e-5 / 0.02)."""
    torch.manual_seed(seed)
    var = VAR(depth, drop_path_rate=drop_path_rate, **{**TINY, **kwargs})
    var.init_weights(init_adaln=1.0, init_adaln_gamma=1.0, init_head=1.0)
    with torch.no_grad():  # non-zero q/v biases and distinct per-head temperatures, one above the clamp
        for block in var.blocks:
            block.attn.q_bias.normal_(0, 0.1)
            block.attn.v_bias.normal_(0, 0.1)
            if block.attn.attn_l2_norm:
                block.attn.scale_mul_1H11.copy_(torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1, 1))
    return var.eval()


def teacher_inputs(var: VAR, B: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label_B = torch.randint(0, var.num_classes, (B,), generator=g)
    return label_B, torch.randn(B, var.L - var.first_l, var.Cvae, generator=g)


def tiny_vqvae(var: VAR) -> VQVAE:
    """A real VQ-VAE matching the tiny VAR's codebook and schedule (1x downsampling, 3x3 images)."""
    torch.manual_seed(3)
    return VQVAE(
        vocab_size=var.V,
        z_channels=var.Cvae,
        ch=32,
        ch_mult=(1,),
        num_res_blocks=0,
        patch_nums=TINY_PATCH_NUMS,
        using_sa=False,
        using_mid_sa=False,
    ).eval()


# ---------------------------------------------------------------------------------------- checkpoint layout
@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_state_dict_matches_released_var(depth: int) -> None:
    with torch.device("meta"):
        var = build_var(depth)
    assert _state_dict_layout(var) == load_reference(f"var_d{depth}")
    assert sum(p.numel() for p in var.parameters()) == RELEASED_PARAMS[depth]
    assert (var.C, var.num_heads) == (64 * depth, depth)
    assert var.drop_path_rate == pytest.approx(0.1 * depth / 24)


def test_state_dict_matches_vargpt_gen() -> None:
    """VARGPT's visual decoder is VAR-d30 with class_emb widened to 32004 rows (num_classes = 32002 + 1)."""
    ref = {k.removeprefix("vargpt_gen."): v for k, v in load_reference("vargpt_llava_v1").items()}
    ref = {k: v for k, v in ref.items() if not k.startswith(("vision_tower", "language_model", "multi_modal", "vae"))}
    ref = {k: v for k, v in ref.items() if not k.startswith("image_gen_projector")}
    with torch.device("meta"):
        var = build_var(30, num_classes=32003)
    assert _state_dict_layout(var) == ref


def test_vqvae_is_not_a_submodule() -> None:
    var = tiny_var()
    keys = set(var.state_dict())
    vq = nn.Linear(3, 3)
    var.bind_vqvae(vq)
    assert var.vqvae is vq and set(var.state_dict()) == keys
    assert all(p is not vq.weight for p in var.parameters())


# ---------------------------------------------------------------------------------------- mask
def test_block_causal_mask() -> None:
    var = VAR(1, embed_dim=8, num_heads=2)  # the real 680-token schedule, narrow width
    bias_LL = var.attn_bias_for_masking[0, 0]
    lvl_L = var.lvl_1L[0]
    cum_ends = torch.tensor(var.schedule.cum_ends)
    assert bias_LL.shape == (680, 680) and var.lvl_1L.dtype == torch.long
    assert torch.equal((bias_LL == 0).sum(1), cum_ends[lvl_L])
    assert torch.equal(bias_LL == 0, lvl_L[None, :] <= lvl_L[:, None])  # block lower triangular, open blocks
    assert torch.isneginf(bias_LL[bias_LL != 0]).all()


# ---------------------------------------------------------------------------------------- KV cache
def _decode_scale_by_scale(var: VAR, label_B: torch.Tensor, teacher: torch.Tensor, cache: VARKVCache) -> list:
    cond_BD = var.cond(label_B)
    logits = []
    for k, (begin, end) in enumerate(var.schedule.begin_end):
        if k == 0:
            x_BlC = var.embed_first_scale(cond_BD)
        else:
            x_BlC = var.embed_scale(k, teacher[:, begin - var.first_l : end - var.first_l])
        logits.append(var.decode(x_BlC, cond_BD, cache=cache))
    return logits


@torch.no_grad()
def test_kv_cached_decode_equals_block_causal_forward() -> None:
    var = tiny_var()
    label_B, teacher = teacher_inputs(var, B=3)
    full_BLV = var(label_B, teacher)
    cache = VARKVCache()
    cached_BLV = torch.cat(_decode_scale_by_scale(var, label_B, teacher, cache), dim=1)
    assert full_BLV.shape == (3, var.L, var.V) and full_BLV.dtype == torch.float32
    torch.testing.assert_close(cached_BLV, full_BLV, atol=1e-5, rtol=1e-5)
    assert len(cache) == var.L and len(cache.layers) == var.depth
    cache.reset()
    assert len(cache) == 0


@torch.no_grad()
def test_kv_cache_select_rows_drops_finished_samples() -> None:
    var = tiny_var()
    label_B, teacher = teacher_inputs(var, B=3)
    cond_BD = var.cond(label_B)
    cache = VARKVCache()
    var.decode(var.embed_first_scale(cond_BD), cond_BD, cache=cache)
    keep = torch.tensor([2, 0])
    cache.select_rows(keep)
    begin, end = var.schedule.begin_end[1]
    logits_BlV = var.decode(var.embed_scale(1, teacher[keep, begin - 1 : end - 1]), cond_BD[keep], cache=cache)
    torch.testing.assert_close(logits_BlV, var(label_B, teacher)[keep, begin:end], atol=1e-5, rtol=1e-5)


def test_kv_cache_blocks_must_run_in_order() -> None:
    with pytest.raises(IndexError):
        VARKVCache().update(1, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))


# ---------------------------------------------------------------------------------------- train / eval
def test_eval_forward_deterministic_and_label_dropout_only_in_training() -> None:
    var = tiny_var(cond_drop_rate=1.0)
    label_B, teacher = teacher_inputs(var, B=4)
    null_B = torch.full_like(label_B, var.null_class)
    with torch.no_grad():
        eval_BLV = var(label_B, teacher)
        assert torch.equal(eval_BLV, var(label_B, teacher))
        eval_null_BLV = var(null_B, teacher)
        assert not torch.allclose(eval_BLV, eval_null_BLV)  # eval mode kept the labels despite rate 1
        var.train()  # drop_path_rate=0, so only the label dropout differs from eval
        torch.testing.assert_close(var(label_B, teacher), eval_null_BLV)
    assert torch.equal(var.drop_labels(label_B), null_B)
    var.cond_drop_rate = 0.0
    assert torch.equal(var.drop_labels(label_B), label_B)


def test_training_backward_reaches_every_parameter() -> None:
    var = tiny_var(drop_path_rate=0.1, cond_drop_rate=0.5).train()
    label_B, teacher = teacher_inputs(var, B=2)
    target_BL = torch.randint(0, var.V, (2, var.L))
    F.cross_entropy(var(label_B, teacher).flatten(0, 1), target_BL.flatten()).backward()
    # The null row gets a gradient only when a label is dropped, so skip class_emb in the check.
    missing = [n for n, p in var.named_parameters() if p.grad is None and n != "class_emb.weight"]
    assert not missing


def test_mixed_precision_paths() -> None:
    var = tiny_var()
    label_B, teacher = teacher_inputs(var, B=2)
    with torch.no_grad():
        ref_BLV = var(label_B, teacher)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_BLV = var(label_B, teacher)
        bf16_BLV = var.to(torch.bfloat16)(label_B, teacher)  # the whole model in bf16, as VARGPT trains
    for out in (amp_BLV, bf16_BLV):
        assert out.dtype == torch.float32
        assert (out - ref_BLV).abs().mean() < 0.05 * ref_BLV.abs().mean()


# ---------------------------------------------------------------------------------------- reference math
def reference_block(block: AdaLNSelfAttn, x_BLC: torch.Tensor, cond_BD: torch.Tensor, bias) -> torch.Tensor:
    """VAR's AdaLNSelfAttn written out with explicit matmuls and softmax, in float64."""
    a, H = block.attn, block.attn.num_heads
    B, L, C = x_BLC.shape

    def d(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double()

    x, cond = d(x_BLC), d(cond_BD)

    def ln(t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)

    def lin(t, layer):
        return t @ d(layer.weight).T + (0 if layer.bias is None else d(layer.bias))

    ada = lin(F.silu(cond), block.ada_lin[1]).view(B, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))

    h = ln(x) * (1 + scale1) + shift1
    qkv = h @ d(a.mat_qkv.weight).T + torch.cat([d(a.q_bias), torch.zeros(C).double(), d(a.v_bias)])
    q, k, v = (t.view(B, L, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if a.attn_l2_norm:
        q = q / q.norm(dim=-1, keepdim=True) * d(a.scale_mul_1H11).clamp(max=math.log(100)).exp()
        k = k / k.norm(dim=-1, keepdim=True)
        scale = 1.0
    else:
        scale = 0.25 / math.sqrt(C // H)
    logits = q @ k.transpose(-1, -2) * scale + (0 if bias is None else d(bias))
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    x = x + lin(o, a.proj) * gamma1

    h = ln(x) * (1 + scale2) + shift2
    return x + lin(F.gelu(lin(h, block.ffn.fc1), approximate="tanh"), block.ffn.fc2) * gamma2


@pytest.mark.parametrize("attn_l2_norm", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@torch.no_grad()
def test_block_matches_reference_attention_math(attn_l2_norm: bool, masked: bool) -> None:
    var = tiny_var(depth=1, attn_l2_norm=attn_l2_norm)
    block = var.blocks[0]
    x_BLC, cond_BD = torch.randn(2, var.L, var.C), torch.randn(2, var.C)
    bias = var.attn_bias_for_masking if masked else None
    out_BLC = block(x_BLC, cond_BD, attn_bias=bias).double()
    torch.testing.assert_close(out_BLC, reference_block(block, x_BLC, cond_BD, bias), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_matches_reference_var_forward() -> None:
    """The whole eval forward against VAR's formulas: embeddings, block-causal blocks, AdaLN head."""
    var = tiny_var()
    label_B, teacher = teacher_inputs(var, B=2)
    cond = var.class_emb.weight[label_B].double()
    x = torch.cat([cond[:, None] + var.pos_start.double(), var.word_embed(teacher).double()], dim=1)
    x = x + var.lvl_embed.weight[var.lvl_1L[0]].double() + var.pos_1LC.double()
    for block in var.blocks:
        x = reference_block(block, x.float(), cond.float(), var.attn_bias_for_masking)
    head_ada = var.head_nm.ada_lin[1]
    scale, shift = (F.silu(cond) @ head_ada.weight.double().T + head_ada.bias.double()).chunk(2, -1)
    h = F.layer_norm(x, (var.C,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    ref_BLV = h @ var.head.weight.double().T + var.head.bias.double()
    torch.testing.assert_close(var(label_B, teacher).double(), ref_BLV, atol=1e-4, rtol=1e-4)


def test_init_weights_follows_var() -> None:
    torch.manual_seed(0)
    var = build_var(2, embed_dim=64, num_heads=2, num_classes=5, patch_nums=TINY_PATCH_NUMS)
    C, std = 64, math.sqrt(1 / (3 * 64))
    assert var.class_emb.weight.std().item() == pytest.approx(std, rel=0.1)
    assert var.head.weight.std().item() == pytest.approx(0.02 * std, rel=0.1)
    assert var.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / 2, rel=0.1)  # 1/sqrt(2 * 2)
    ada = var.blocks[0].ada_lin[1].weight
    assert ada[: 2 * C].std().item() == pytest.approx(1e-5 * std, rel=0.1)
    assert ada[2 * C :].std().item() == pytest.approx(0.5 * std, rel=0.1)
    assert torch.allclose(var.blocks[0].attn.scale_mul_1H11, torch.tensor(4.0).log())
    assert not var.blocks[0].attn.zero_k_bias.any() and not var.head.bias.any()


# ---------------------------------------------------------------------------------------- sampling
def test_sample_greedy_deterministic_shapes_and_one_decode_per_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    var = tiny_var()
    var.bind_vqvae(tiny_vqvae(var))
    calls: list[int] = []
    decode = var.decode

    def counting_decode(x_BlC, cond_BD, attn_bias=None, cache=None, ada=None):
        assert attn_bias is None and cache is not None and x_BlC.shape[0] == 2 * 3  # doubled for CFG
        calls.append(x_BlC.shape[1])
        return decode(x_BlC, cond_BD, attn_bias=attn_bias, cache=cache, ada=ada)

    monkeypatch.setattr(var, "decode", counting_decode)
    codes = var.sample([0, 3, 4], top_k=1, seeds=[0, 1, 2])
    assert calls == [p * p for p in TINY_PATCH_NUMS]
    assert [tuple(c.shape) for c in codes] == [(3, p * p) for p in TINY_PATCH_NUMS]
    assert all(c.dtype == torch.long and ((c >= 0) & (c < var.V)).all() for c in codes)
    again = var.sample(torch.tensor([0, 3, 4]), top_k=1, seeds=[5, 6, 7])
    assert all(torch.equal(a, b) for a, b in zip(codes, again, strict=True))


def test_sample_batched_equals_one_by_one() -> None:
    var = tiny_var()
    vq = tiny_vqvae(var)
    labels = [1, 0, 4, 2]
    batched = var.sample(labels, cfg=3.0, top_k=1, vqvae=vq)
    single = [var.sample([label], cfg=3.0, top_k=1, vqvae=vq) for label in labels]
    for k in range(len(TINY_PATCH_NUMS)):
        assert torch.equal(batched[k], torch.cat([s[k] for s in single]))


def test_seeded_sampling_batched_equals_one_by_one() -> None:
    """Sample i draws its codes from its own generator (seed ``seeds[i]``): the batch it is drawn in, and the
    samples beside it, change nothing. VAR's one shared generator failed this (a sample's codes depended on the
    draws of the samples before it)."""
    var = tiny_var().eval()
    vq = tiny_vqvae(var)
    labels, seeds = [1, 0, 4, 2, 1], [11, 3, 7, 0, 12]
    batched = var.sample(labels, cfg=1.5, top_k=50, top_p=0.9, seeds=seeds, vqvae=vq)
    single = [
        var.sample([label], cfg=1.5, top_k=50, top_p=0.9, seeds=[seed], vqvae=vq)
        for label, seed in zip(labels, seeds, strict=True)
    ]
    for k in range(len(TINY_PATCH_NUMS)):
        assert torch.equal(batched[k], torch.cat([s[k] for s in single]))
    # The draw is random and seeded: same label, other seed, other codes; same seed, same codes.
    assert not torch.equal(torch.cat(batched, 1)[0], torch.cat(batched, 1)[4])
    assert torch.equal(
        torch.cat(var.sample([1], cfg=1.5, top_k=50, top_p=0.9, seeds=[11], vqvae=vq), 1), torch.cat(single[0], 1)
    )


def test_sample_wants_one_seed_per_sample() -> None:
    var = tiny_var()
    with pytest.raises(ValueError, match="2 seeds for 3 class labels"):
        var.sample([0, 1, 2], seeds=[0, 1], vqvae=tiny_vqvae(var))


@torch.no_grad()
def test_sample_applies_guidance_to_first_scale_logits() -> None:
    var = tiny_var()
    vq = tiny_vqvae(var)
    label_B = torch.tensor([1, 2])
    cond_2BD = var.cond(torch.tensor([1, 2, var.null_class, var.null_class]))
    logits_2BlV = var.decode(var.embed_first_scale(cond_2BD), cond_2BD, cache=VARKVCache())
    guided_BlV = 3.0 * logits_2BlV[:2] - 2.0 * logits_2BlV[2:]  # constant t = 2
    codes = var.sample(label_B, cfg=2.0, top_k=1, cfg_schedule="constant", vqvae=vq)
    assert torch.equal(codes[0], guided_BlV.argmax(-1))
    with pytest.raises(ValueError, match="ramp"):
        var.sample(label_B, cfg_schedule="cosine", vqvae=vq)


@torch.no_grad()
def test_greedy_sample_is_the_argmax_of_teacher_forcing_on_its_own_codes() -> None:
    """Inference (KV cache, ``next_input``) and training (``codes_to_teacher_input``, block-causal mask) agree:
    without guidance, the teacher-forced logits on the sampled codes pick exactly those codes again."""
    var = tiny_var()
    vq = tiny_vqvae(var)
    label_B = torch.tensor([0, 3, 4])
    codes = var.sample(label_B, cfg=0.0, top_k=1, vqvae=vq)
    logits_BLV = var(label_B, vq.codes_to_teacher_input(codes))
    assert torch.equal(logits_BLV.argmax(-1), torch.cat(codes, dim=1))
    assert vq.codes_to_img(codes).shape == (3, 3, 3, 3)


def test_sample_without_vqvae_says_how_to_bind_one() -> None:
    with pytest.raises(RuntimeError, match="bind_vqvae"):
        tiny_var().sample([0])
