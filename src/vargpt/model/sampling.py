"""Token sampling for next-scale generation: top-k / top-p filtering and the classifier-free-guidance schedule.

Shared by the class-conditional VAR sampler (``var.VAR.sample``) and VARGPT's image generation, so both use
VAR's exact rules (VARGPT-REFERENCE.md 2.3, 12.7, 12.8). Everything stays on the device: no ``.item()`` and
no branching on tensor values, so a generation loop never waits for the GPU.
"""

from __future__ import annotations

import torch

CFG_SCHEDULES: tuple[str, ...] = ("ramp", "constant")


def cfg_ratio(cfg: float, k: int, num_scales: int, schedule: str = "ramp") -> float:
    """Guidance strength ``t`` at scale ``k``; logits are ``(1 + t) * cond - t * uncond``.

    ``'ramp'`` (VAR and VARGPT): ``cfg * k / (K - 1)``, no guidance at the 1x1 scale and ``cfg`` at the last.
    ``'constant'``: ``cfg`` at every scale. A single-scale schedule gets ``cfg`` under both.
    """
    if schedule == "ramp":
        return cfg * k / (num_scales - 1) if num_scales > 1 else cfg
    if schedule == "constant":
        return cfg
    raise ValueError(f"unknown cfg schedule {schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Return a copy of the logits with the tokens outside the top-k / top-p sets set to -inf.

    top-k keeps every logit >= the k-th largest (ties may keep more than k). top-p, applied after top-k,
    sorts ascending and removes the tokens whose ascending cumulative probability is <= 1 - top_p: what is
    left is the smallest set of most likely tokens holding more than ``top_p`` of the mass. The most likely
    token always survives. ``top_k <= 0`` / ``top_p <= 0`` switch a filter off.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_largest_Bl1 = logits_BlV.topk(min(top_k, V), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_largest_Bl1, float("-inf"))
    if top_p > 0:
        sorted_BlV, sorted_idx_BlV = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove_BlV = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        sorted_remove_BlV[..., -1:] = False  # the argmax, even when its own mass is <= 1 - top_p
        remove_BlV = sorted_remove_BlV.scatter(-1, sorted_idx_BlV, sorted_remove_BlV)
        logits_BlV = logits_BlV.masked_fill(remove_BlV, float("-inf"))
    return logits_BlV


def sample_top_k_top_p(
    logits_BlV: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> torch.Tensor:
    """Sample token ids from top-k / top-p filtered logits (VAR's ``sample_with_top_k_top_p_``).

    Returns (B, l) int64 when ``num_samples == 1`` (the generation case), else (B, l, num_samples), drawn
    with replacement. Unlike VAR the input logits are not modified in place, the softmax is taken in fp32
    whatever the logits' dtype, and VAR's "negative num_samples means without replacement" is dropped.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, l, V = logits_BlV.shape
    probs_NV = filter_top_k_top_p(logits_BlV.float(), top_k, top_p).softmax(dim=-1).view(-1, V)
    idx_Bln = torch.multinomial(probs_NV, num_samples, replacement=True, generator=generator).view(B, l, num_samples)
    return idx_Bln[..., 0] if num_samples == 1 else idx_Bln
