"""The three projectors between VARGPT's spaces, with the released parameter names.

* ``UnderstandingProjector``: LLaVA-1.5's ``multi_modal_projector`` (vision width -> LLM width, 2-layer MLP).
* ``GenProjector``: VARGPT's ``GenPatchMerger``, used twice: ``image_gen_projector`` (VAR width -> LLM width)
  and ``image_gen_projector_out`` (LLM width -> VAR width) (VARGPT-REFERENCE.md 1.4, 1.6).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class UnderstandingProjector(nn.Module):
    """``linear_1 -> act -> linear_2`` (LlavaMultiModalProjector), exact GELU in the release."""

    def __init__(self, vision_dim: int, llm_dim: int, act: str = "gelu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, feats_NPD: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(feats_NPD)))


class GenProjector(nn.Module):
    """``mlp = Linear(in, in) -> GELU -> Linear(in, out)``.

    ``ln_q`` exists only so that the released state dict loads strictly: the release builds it and never
    calls it in forward, and neither do we (it gets no gradient, so the optimizer skips it).
    """

    def __init__(self, in_dim: int, out_dim: int, ln_eps: float = 1e-6) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(in_dim, eps=ln_eps)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.mlp(x_BLC)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) weights and zero biases: what HF's ``post_init`` gives the released projectors."""
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)
