"""One scale of next-scale generation, shared by class-conditional ``VAR.sample`` and VARGPT's mixed-modal decoder.

Per scale k (VARGPT-REFERENCE.md 2.3): the VAR decoder's blocks and head over the scale's input (with guidance the
conditional rows first, then as many unconditional rows), the guidance mix ``(1 + t) * cond - t * uncond``, one
code per position drawn with each sample's own generator (:func:`vargpt.model.sampling.pick_codes`), the caller's
forced codes where it has them (teacher forcing), the VQ-VAE's ``next_input`` and the embedding of scale k+1's
input. The two callers differ only in what they feed the decoder: VAR its own embeddings of that input, VARGPT
the LLM's hidden states over it, projected back to VAR's width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from vargpt.model.sampling import pick_codes
from vargpt.model.var_blocks import VARKVCache

if TYPE_CHECKING:  # var.py imports this module for VAR.sample
    from vargpt.model.var import VAR


class NextInputVQVAE(Protocol):
    """What the scale step needs from the multi-scale VQ-VAE."""

    def next_input(
        self, k: int, f_hat: torch.Tensor | None, codes_Bl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale ``k``'s codes to ``f_hat`` (None before scale 0); return it and scale k+1's (B, l, Cvae) input."""
        ...


@dataclass
class ScaleOutput:
    """What one scale produced."""

    codes: torch.Tensor  # (B, l) long: the picked (or forced) codes of the scale
    logits: torch.Tensor  # (B, l, V) fp32: the guided logits
    next_x: torch.Tensor | None  # (B, l', C): VAR's input embeddings of scale k+1; None after the last scale


class ScaleSampler:
    """The per-scale state of one batch of images: the VAR's KV cache and the VQ-VAE's running ``f_hat``.

    Args:
        var: the VAR decoder.
        vqvae: the VQ-VAE the codes belong to.
        ratios: the guidance strength of every scale (``cfg_ratio``); None: no guidance (no unconditional rows).
        top_k, top_p: the code filters (``top_k == 1``: greedy).
        generators: one per sample, on the model's device: sample i's codes are drawn from ``generators[i]`` only.
    """

    def __init__(
        self,
        var: VAR,
        vqvae: NextInputVQVAE,
        ratios: Sequence[float] | None,
        top_k: int,
        top_p: float,
        generators: Sequence[torch.Generator],
    ) -> None:
        self.var, self.vqvae, self.ratios = var, vqvae, ratios
        self.top_k, self.top_p, self.generators = top_k, top_p, list(generators)
        self.cache = VARKVCache()
        self.f_hat: torch.Tensor | None = None  # the image so far in VQ-VAE feature space; decode it at the end

    def step(
        self,
        k: int,
        x_RlC: torch.Tensor,
        cond_RD: torch.Tensor,
        forced: Sequence[torch.Tensor | None] = (),
    ) -> ScaleOutput:
        """Scale ``k`` from its input ``x_RlC`` (B rows, or 2B with guidance) and AdaLN condition ``cond_RD``.

        ``forced[i]``, when given and not None, replaces sample i's codes (the draw still happens, so a sample's
        generator advances the same whether or not another is forced).
        """
        B = len(self.generators)
        logits_RlV = self.var.decode(x_RlC, cond_RD, attn_bias=None, cache=self.cache)
        if self.ratios is None:
            logits_BlV = logits_RlV
        else:
            t = self.ratios[k]
            logits_BlV = (1 + t) * logits_RlV[:B] - t * logits_RlV[B:]
        codes_Bl = pick_codes(logits_BlV, self.top_k, self.top_p, self.generators)
        for i, codes_l in enumerate(forced):
            if codes_l is not None:
                codes_Bl[i] = codes_l.to(codes_Bl).view(-1)
        self.f_hat, next_BlCvae = self.vqvae.next_input(k, self.f_hat, codes_Bl)
        next_x_BlC = None if next_BlCvae is None else self.var.embed_scale(k + 1, next_BlCvae)
        return ScaleOutput(codes_Bl, logits_BlV, next_x_BlC)
