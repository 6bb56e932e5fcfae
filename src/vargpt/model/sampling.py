"""Token sampling for next-scale generation: top-k / top-p filtering, the per-sample code picker and the
classifier-free-guidance schedule.

Used by the one VAR scale step (``scale_step.ScaleSampler``: class-conditional ``VAR.sample`` and VARGPT's image
generation) and by the text sampler of ``vargpt.inference.decoding``, so all use VAR's filtering rules
(VARGPT-REFERENCE.md 2.3, 12.7, 12.8). Everything stays on the device: no ``.item()`` and no branching on tensor
values, so a generation loop never waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    if 0 < top_k < V:  # top_k >= V keeps everything: no top-k pass (the tiny config's V = 512 < 900)
        kth_largest_Bl1 = logits_BlV.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_largest_Bl1, float("-inf"))
    if top_p > 0:
        sorted_BlV, sorted_idx_BlV = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove_BlV = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        sorted_remove_BlV[..., -1:] = False  # the argmax, even when its own mass is <= 1 - top_p
        remove_BlV = sorted_remove_BlV.scatter(-1, sorted_idx_BlV, sorted_remove_BlV)
        logits_BlV = logits_BlV.masked_fill(remove_BlV, float("-inf"))
    return logits_BlV


def filter_top_k_top_p_fast(logits_BlV: torch.Tensor, top_k: int, top_p: float = 0.0) -> torch.Tensor:
    """:func:`filter_top_k_top_p` without sorting the whole vocabulary: ``topk(k, sorted=True)``, then top-p over
    the k survivors. The same kept set, hence the same codes, except on exact ties: of the k-th logit (both keep
    every tie, but the top-p mass here counts k of them, so the top-p cut may fall elsewhere) or at the top-p cut
    (this keeps every logit equal to the last kept one, the sort-based filter may drop some of them).

    The top-p cumulative mass is computed over the same full-width row as the full filter (the V - k filtered
    tokens as -inf, holding exactly 0 mass, ahead of the survivors in ascending order), so the softmax sums in
    the same order and the cut falls on the same token bit for bit. Needs ``0 < top_k < V``.
    """
    V = logits_BlV.shape[-1]
    if not 0 < top_k < V:
        raise ValueError(f"the fast filter needs 0 < top_k < V = {V}, got top_k={top_k}")
    top_BlK = logits_BlV.topk(top_k, dim=-1, sorted=True).values  # descending
    threshold_Bl1 = top_BlK[..., -1:]
    if top_p > 0:
        ascending_BlK = top_BlK.flip(-1)
        removed_Blr = ascending_BlK.new_full((*top_BlK.shape[:-1], V - top_k), float("-inf"))
        filtered_BlV = torch.cat((removed_Blr, ascending_BlK), dim=-1)
        cum_BlK = filtered_BlV.softmax(dim=-1)[..., V - top_k :].cumsum(dim=-1)
        # The removed tokens are a prefix of the ascending order (the mass only grows); the argmax always stays.
        removed_Bl1 = (cum_BlK[..., :-1] <= 1 - top_p).sum(dim=-1, keepdim=True)
        threshold_Bl1 = ascending_BlK.gather(-1, removed_Bl1)
    return logits_BlV.masked_fill(logits_BlV < threshold_Bl1, float("-inf"))


def inverse_cdf(probs_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from ``probs`` given uniforms in [0, 1): the first index whose cumulative mass
    exceeds ``u`` times the total. Batched, with each row's uniforms from that row's own generator."""
    cdf_BlV = probs_BlV.float().cumsum(-1)
    target_Bl1 = u_Bl[..., None].to(cdf_BlV.dtype) * cdf_BlV[..., -1:]
    return torch.searchsorted(cdf_BlV, target_Bl1, right=True).squeeze(-1).clamp_(max=probs_BlV.shape[-1] - 1)


def pick_codes(
    logits_BlV: torch.Tensor,
    top_k: int,
    top_p: float,
    generators: Sequence[torch.Generator],
    fast_filter: bool = False,
) -> torch.Tensor:
    """One code per position of every sample (B, l): the argmax when ``top_k == 1``, else a draw from the top-k /
    top-p filtered softmax by inverse CDF, sample ``i``'s l uniforms from ``generators[i]`` alone.

    Per-sample generators make a sample's codes independent of the batch it is drawn in: a seeded batched call
    gives the codes of one call per sample (VAR drew from one generator shared by the batch). ``fast_filter``:
    :func:`filter_top_k_top_p_fast` where it applies (0 < top_k < V), the same codes up to exact ties.
    """
    if top_k == 1:
        return logits_BlV.argmax(-1)
    fast = fast_filter and 0 < top_k < logits_BlV.shape[-1]
    filtered_BlV = (filter_top_k_top_p_fast if fast else filter_top_k_top_p)(logits_BlV, top_k, top_p)
    probs_BlV = filtered_BlV.softmax(-1)
    l = logits_BlV.shape[1]
    u_Bl = torch.stack([torch.rand(l, generator=g, device=logits_BlV.device) for g in generators])
    return inverse_cdf(probs_BlV, u_Bl)
