"""Token bookkeeping of VAR's next-scale prediction, shared by the VQ-VAE, the VAR decoder and VARGPT.

A multi-scale image of ``patch_nums = (p_0, ..., p_{K-1})`` is a sequence of ``L = sum(p_k^2)`` tokens in
scale-major order (the 1x1 scale first, each scale row-major). Everything that depends only on
``patch_nums`` lives here so the three models cannot disagree about it (VARGPT-REFERENCE.md 1.7, 2.4, 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

VAR_PATCH_NUMS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class ScaleSchedule:
    """The token layout of one ``patch_nums`` tuple."""

    patch_nums: tuple[int, ...]

    def __post_init__(self) -> None:
        pn = tuple(int(p) for p in self.patch_nums)
        if not pn or any(p <= 0 for p in pn) or list(pn) != sorted(set(pn)):
            raise ValueError(f"patch_nums must be strictly increasing positive ints, got {self.patch_nums}")
        object.__setattr__(self, "patch_nums", pn)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.patch_nums)

    @property
    def num_tokens(self) -> int:
        """L: tokens of one image over all scales (680 for VAR's 256-px schedule)."""
        return sum(self.tokens_per_scale)

    @property
    def max_side(self) -> int:
        return self.patch_nums[-1]

    @cached_property
    def begin_end(self) -> tuple[tuple[int, int], ...]:
        """(begin, end) token index of every scale."""
        out, cur = [], 0
        for n in self.tokens_per_scale:
            out.append((cur, cur + n))
            cur += n
        return tuple(out)

    @property
    def cum_ends(self) -> tuple[int, ...]:
        return tuple(e for _, e in self.begin_end)

    def level_ids(self) -> torch.Tensor:
        """lvl_1L: the scale index of every token, shape (1, L), int64."""
        return torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(self.tokens_per_scale)])[None]

    def block_causal_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """attn_bias_for_masking, shape (1, 1, L, L): 0 where scale(i) >= scale(j), -inf elsewhere.

        A token sees its own scale and every earlier scale (VAR's block-causal mask).
        """
        d_1L = self.level_ids()
        d_L1 = d_1L.transpose(0, 1)
        return torch.where(d_L1 >= d_1L, 0.0, float("-inf")).to(dtype)[None, None]

    def phi_index(self, k: int, num_phi: int) -> int:
        """Which of ``num_phi`` partially shared phi convolutions scale ``k`` uses.

        VAR's PhiPartiallyShared / PhiNonShared: ticks = linspace(m, 1 - m, K') with K' = num_phi and
        m = 1/(3K') when K' == 4 else 1/(2K'); scale k is routed to argmin |tick - k/(K-1)|.
        For K=10, K'=4 this is [0,0,1,1,1,2,2,3,3,3].
        """
        if num_phi == 1:
            return 0
        margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
        ticks = torch.linspace(margin, 1 - margin, num_phi, dtype=torch.float64)
        ratio = k / (self.num_scales - 1) if self.num_scales > 1 else 0.0
        return int((ticks - ratio).abs().argmin().item())
