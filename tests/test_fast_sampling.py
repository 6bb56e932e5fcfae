"""Tests of the scale step's fast paths (``ScaleStepOptions``): each gives the plain path's values, each can be
switched off, and the compiled step is one graph per scale without recompiles. Speed lives in bench/generate.py.
"""

from __future__ import annotations

import pytest
import torch
from test_var import TINY_PATCH_NUMS, teacher_inputs, tiny_var, tiny_vqvae

from vargpt.model.sampling import filter_top_k_top_p, filter_top_k_top_p_fast, pick_codes
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.scale_step import ScaleSampler, ScaleStepOptions
from vargpt.model.var import VAR
from vargpt.model.var_blocks import VARKVCache

PLAIN = ScaleStepOptions.plain()


def _sample(var: VAR, options: ScaleStepOptions, top_k: int = 10, top_p: float = 0.9) -> torch.Tensor:
    codes = var.sample([1, 0, 4], cfg=1.5, top_k=top_k, top_p=top_p, seeds=[3, 5, 7], options=options)
    return torch.cat(codes, dim=1)


def _decode_scales(var: VAR, cache: VARKVCache, cached_adaln: bool) -> torch.Tensor:
    """Logits of every scale of a teacher-forced input, decoded scale by scale through ``cache``."""
    label_B, teacher = teacher_inputs(var, B=3)
    cond_BD = var.cond(label_B)
    ada = var.adaln_conditions(cond_BD) if cached_adaln else None
    logits = []
    for k, (begin, end) in enumerate(var.schedule.begin_end):
        x_BlC = var.embed_first_scale(cond_BD) if k == 0 else var.embed_scale(k, teacher[:, begin - 1 : end - 1])
        logits.append(var.decode(x_BlC, cond_BD, cache=cache, ada=ada))
    return torch.cat(logits, dim=1)


# ---------------------------------------------------------------------------------------- top-k / top-p
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fast_filter_keeps_what_the_full_sort_keeps(scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 10))
    logits_BlV = torch.randn(2, 16, 4096, generator=g) * scale
    for top_k, top_p in [(900, 0.96), (900, 0.0), (50, 0.5), (4095, 0.99)]:
        full = filter_top_k_top_p(logits_BlV, top_k, top_p)
        fast = filter_top_k_top_p_fast(logits_BlV, top_k, top_p)
        assert torch.equal(full, fast), (top_k, top_p)


def test_fast_filter_ties() -> None:
    """Both keep every tie of the k-th logit; the top-p mass here counts only k of them (documented)."""
    tied = torch.tensor([[[3.0, 2.0, 2.0, 2.0, 1.0]]])
    assert torch.isfinite(filter_top_k_top_p(tied, top_k=2)).sum() == 4
    assert torch.isfinite(filter_top_k_top_p_fast(tied, top_k=2)).sum() == 4
    # 3.0 holds 0.48 of the mass of {3, 2, 2, 2} (the full filter keeps one 2 too), 0.73 of {3, 2} (this one)
    assert torch.isfinite(filter_top_k_top_p(tied, top_k=2, top_p=0.6)).sum() == 2
    assert torch.isfinite(filter_top_k_top_p_fast(tied, top_k=2, top_p=0.6)).sum() == 1
    with pytest.raises(ValueError, match="0 < top_k < V"):
        filter_top_k_top_p_fast(tied, top_k=5)


def test_pick_codes_fast_filter_same_draws() -> None:
    logits_BlV = torch.randn(4, 30, 512, generator=torch.Generator().manual_seed(0))
    draws = [
        pick_codes(logits_BlV, 100, 0.9, [torch.Generator().manual_seed(i) for i in range(4)], fast_filter=fast)
        for fast in (False, True)
    ]
    assert torch.equal(*draws)


# ---------------------------------------------------------------------------------------- KV cache, AdaLN
@torch.no_grad()
def test_preallocated_cache_and_cached_adaln_equal_the_plain_decode() -> None:
    var = tiny_var()
    plain_BLV = _decode_scales(var, VARKVCache(), cached_adaln=False)
    static = var.new_kv_cache(rows=3, device=torch.device("cpu"))
    fast_BLV = _decode_scales(var, static, cached_adaln=True)
    assert torch.equal(fast_BLV, plain_BLV)
    assert len(static) == var.L and static.layers[0][0].shape == (3, var.num_heads, var.L, var.C // var.num_heads)


def test_reused_cache_keeps_its_buffers_and_starts_empty() -> None:
    var = tiny_var()
    cpu = torch.device("cpu")
    first = var.new_kv_cache(rows=2, device=cpu, reuse=True)
    k_BHlc = torch.zeros(2, var.num_heads, 1, var.C // var.num_heads)
    first.update(0, k_BHlc, k_BHlc)
    assert len(first) == 1
    again = var.new_kv_cache(rows=2, device=cpu, reuse=True)
    assert again is first and len(again) == 0 and again.filled == [0] * var.depth
    assert var.new_kv_cache(rows=2, device=cpu) is not first  # without reuse: fresh buffers


def test_preallocated_cache_rejects_overflow_and_unallocated_blocks() -> None:
    cache = VARKVCache(capacity=2)
    with pytest.raises(IndexError, match="allocate"):
        cache.update(0, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    cache.allocate(1, (1, 1, 1), torch.float32, torch.device("cpu"))
    cache.update(0, torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))
    with pytest.raises(IndexError, match="capacity 2"):
        cache.update(0, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="capacity"):
        VARKVCache().allocate(1, (1, 1, 1), torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------------------------------- the sampler
def test_default_fast_paths_give_the_plain_sampled_codes() -> None:
    var = tiny_var()
    var.bind_vqvae(tiny_vqvae(var))
    plain = _sample(var, PLAIN)
    assert torch.equal(_sample(var, ScaleStepOptions()), plain)
    assert torch.equal(_sample(var, ScaleStepOptions(fast_filter=True)), plain)  # no ties in these logits
    assert torch.equal(_sample(var, ScaleStepOptions(), top_k=1), _sample(var, PLAIN, top_k=1))


def test_plain_options_take_the_old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched off: a growing (concatenating) cache, the AdaLN modulations inside the blocks, the full sort."""
    var = tiny_var()
    var.bind_vqvae(tiny_vqvae(var))
    seen: list[tuple[int | None, bool]] = []
    decode = var.decode

    def recording_decode(x_BlC, cond_BD, attn_bias=None, cache=None, ada=None):
        seen.append((cache.capacity, ada is None))
        return decode(x_BlC, cond_BD, attn_bias=attn_bias, cache=cache, ada=ada)

    monkeypatch.setattr(var, "decode", recording_decode)
    sort_calls = []
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sort_calls.append(1) or torch.sort(self, *a, **kw))
    _sample(var, PLAIN)
    assert seen == [(None, True)] * len(TINY_PATCH_NUMS) and len(sort_calls) == len(TINY_PATCH_NUMS)
    seen.clear()
    sort_calls.clear()
    _sample(var, ScaleStepOptions(fast_filter=True))
    assert seen == [(var.L, False)] * len(TINY_PATCH_NUMS) and not sort_calls


def test_bf16_runs_the_blocks_in_bf16_and_stays_close() -> None:
    var = tiny_var()
    vq = tiny_vqvae(var)
    cond_RD = var.cond(torch.tensor([1, 0, var.null_class, var.null_class]))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    outs = {}
    for bf16 in (False, True):
        sampler = ScaleSampler(var, vq, [0.0, 0.75, 1.5], 1, 0.0, gens, options=ScaleStepOptions(bf16=bf16))
        with torch.no_grad():
            outs[bf16] = sampler.step(0, var.embed_first_scale(cond_RD), cond_RD)
        assert sampler.cache.layers[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert outs[True].logits.dtype == torch.float32  # the head stays in the weights' dtype
    torch.testing.assert_close(outs[True].logits, outs[False].logits, atol=0.1, rtol=0.05)


def test_options_are_validated_and_surface_in_the_sampling_config() -> None:
    with pytest.raises(ValueError, match="compile='fast'"):
        ScaleStepOptions(compile="fast")
    with pytest.raises(ValueError, match="static_cache"):
        ScaleStepOptions(static_cache=False, compile="default")
    assert SamplingConfig().scale_step_options() == ScaleStepOptions()
    cfg = SamplingConfig.coerce({"var_bf16": True, "var_compile": "reduce-overhead", "var_fast_filter": True})
    assert cfg.scale_step_options() == ScaleStepOptions(bf16=True, compile="reduce-overhead", fast_filter=True)
    with pytest.raises(ValueError, match="sampling: .*var_compile"):
        SamplingConfig(var_compile="fast")


# ---------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow  # compiles one graph per scale: about a minute on two busy CPU cores
def test_compiled_scale_step_same_codes_one_graph_per_scale_no_recompile() -> None:
    """The GPU setting (mode reduce-overhead: CUDA graphs there; on a CPU inductor alone), ``fullgraph=True``."""
    from torch._dynamo.utils import counters

    var = tiny_var()
    var.bind_vqvae(tiny_vqvae(var))
    options = ScaleStepOptions(compile="reduce-overhead")
    counters.clear()
    compiled = _sample(var, options, top_k=1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == len(TINY_PATCH_NUMS) and not counters["graph_break"]
    assert torch.equal(compiled, _sample(var, PLAIN, top_k=1))
    assert torch.equal(_sample(var, options, top_k=1), compiled)
    assert counters["stats"]["unique_graphs"] == graphs  # the second call reused every scale's graph
