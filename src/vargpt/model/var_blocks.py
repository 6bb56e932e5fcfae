"""The three building blocks of VAR's transformer: AdaLN self-attention block, FFN, AdaLN before the head.

A re-statement of FoundationVision/VAR ``models/basic_var.py`` (VARGPT-REFERENCE.md 1.5) with identical
parameter and buffer names, so VAR and VARGPT checkpoints load with ``strict=True``. Differences from VAR:
attention always goes through ``F.scaled_dot_product_attention`` (which picks flash/memory-efficient kernels
on GPU by itself) instead of VAR's optional flash-attn/xformers imports and fused MLP/LayerNorm kernels;
the KV cache is an explicit object (``VARKVCache``) passed to ``forward`` instead of state switched on with
``kv_caching(True)`` inside every attention module, so one model can serve several generations at once and
finished rows can be dropped; attention/projection dropout (0 in every released VAR) is not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VARKVCache:
    """Keys and values of the scales decoded so far, one ``(k_BHlc, v_BHlc)`` pair per block.

    Filled scale by scale during generation: block ``i`` writes the keys/values of the current scale and
    attends over everything written before. Two layouts with identical values:

    - ``capacity=None``: each scale is concatenated to the previous ones (shapes grow; the layout of
      ``decode(cache=...)`` calls that do not know the image's length);
    - ``capacity=L``: :meth:`allocate` makes one (B, H, L, c) buffer per block once, every scale is written into
      it in place and attention reads the filled prefix. No allocation and no copy of older scales per scale,
      and the buffers keep their addresses, as a CUDA graph of the scale step needs.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.filled: list[int] = []  # tokens written per block (preallocated layout)

    def __len__(self) -> int:
        """Tokens cached so far (equal for every block once a scale has passed through all blocks)."""
        if self.capacity is not None:
            return self.filled[0] if self.filled else 0
        return self.layers[0][0].shape[2] if self.layers else 0

    def allocate(
        self, num_blocks: int, shape_BHc: tuple[int, int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        """Make the empty (B, H, capacity, c) key and value buffers of every block (preallocated layout only)."""
        if self.capacity is None:
            raise RuntimeError("allocate() needs a capacity: VARKVCache(capacity=L)")
        B, H, c = shape_BHc
        self.layers = [
            tuple(torch.empty(B, H, self.capacity, c, dtype=dtype, device=device) for _ in range(2))
            for _ in range(num_blocks)
        ]
        self.filled = [0] * num_blocks

    def update(self, block_idx: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the current scale's keys/values of one block; return all keys/values of that block."""
        if self.capacity is not None:
            return self._write(block_idx, k_BHlc, v_BHlc)
        if block_idx == len(self.layers):
            self.layers.append((k_BHlc, v_BHlc))
        elif block_idx < len(self.layers):
            k_old, v_old = self.layers[block_idx]
            self.layers[block_idx] = (torch.cat((k_old, k_BHlc), dim=2), torch.cat((v_old, v_BHlc), dim=2))
        else:
            raise IndexError(f"block {block_idx} written before block {len(self.layers)}: blocks run in order")
        return self.layers[block_idx]

    def _write(self, block_idx: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block_idx >= len(self.layers):
            raise IndexError(f"block {block_idx}: {len(self.layers)} blocks allocated (call allocate() first)")
        begin = self.filled[block_idx]
        end = begin + k_BHlc.shape[2]
        if end > self.capacity:
            raise IndexError(f"block {block_idx}: {end} tokens exceed the cache's capacity {self.capacity}")
        k_buf, v_buf = self.layers[block_idx]
        k_buf[:, :, begin:end].copy_(k_BHlc)
        v_buf[:, :, begin:end].copy_(v_BHlc)
        self.filled[block_idx] = end
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def select_rows(self, idx_B: torch.Tensor) -> None:
        """Keep only the batch rows ``idx_B`` (an index or boolean mask), e.g. to drop finished samples."""
        self.layers = [(k[idx_B], v[idx_B]) for k, v in self.layers]

    def reset(self) -> None:
        self.layers, self.filled = [], []

    def rewind(self) -> None:
        """Empty a preallocated cache but keep its buffers (and their addresses) for the next image."""
        self.filled = [0] * len(self.layers)


class DropPath(nn.Module):
    """Stochastic depth per sample (as timm's ``DropPath``, which VAR copies); written here to avoid timm."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep_B11 = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep_B11.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class FFN(nn.Module):
    """fc1 -> GELU (tanh approximation, as VAR) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with VAR's L2-normalised ("cosine") queries and keys.

    With ``attn_l2_norm`` q and k are unit vectors along the head dim and q is multiplied by a learnable
    per-head temperature ``exp(min(scale_mul_1H11, log 100))`` (initialised to 4), so the softmax scale is 1.
    The qkv projection has no bias of its own: the bias is ``cat(q_bias, zero_k_bias, v_bias)`` where the k
    part is a zero buffer (a key bias only shifts every logit of a query by the same amount).
    """

    def __init__(self, block_idx: int, embed_dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            # VAR's value for plain attention: a quarter of the usual head_dim^-0.5.
            self.scale = 0.25 / math.sqrt(self.head_dim)

        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None, cache: VARKVCache | None = None
    ) -> torch.Tensor:
        """Attend over ``x_BLC`` (and, with ``cache``, over every earlier scale held in it).

        ``attn_bias``: additive mask broadcastable to (B, H, L, L_total), 0 or -inf; None means no mask.
        """
        B, L, C = x_BLC.shape
        bias_3C = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BL3Hc = F.linear(x_BLC, self.mat_qkv.weight, bias_3C).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            # The fp32 temperature (and the norm, under autocast) would promote q and k to fp32; VAR casts
            # them back to the compute dtype the same way.
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11).to(v_BHLc.dtype)
            k_BHLc = F.normalize(k_BHLc, dim=-1).to(v_BHLc.dtype)
        if cache is not None:
            k_BHLc, v_BHLc = cache.update(self.block_idx, k_BHLc, v_BHLc)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q_BHLc.dtype)  # SDPA wants the float mask in the query's dtype
        o_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=self.scale)
        return self.proj(o_BHLc.transpose(1, 2).reshape(B, L, C))

    def extra_repr(self) -> str:
        return f"block_idx={self.block_idx}, num_heads={self.num_heads}, attn_l2_norm={self.attn_l2_norm}"


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the condition (adaptive LayerNorm).

    ``gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond)``;
    ``x += drop_path(attn(LN(x)(1+scale1)+shift1) * gamma1)``; ``x += drop_path(ffn(LN(x)(1+scale2)+shift2) * gamma2)``.
    VAR's ``shared_aln`` variant (one modulation for all blocks, used only by its 512-px d36) is not implemented.
    """

    def __init__(
        self,
        block_idx: int,
        embed_dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
    ) -> None:
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(block_idx, embed_dim, num_heads, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        cache: VARKVCache | None = None,
        ada_B16C: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ada_B16C``: this block's :meth:`modulation` of ``cond_BD`` when the caller computed it already (a
        generation reuses it at every scale); None computes it here (training: the autograd graph as before)."""
        ada_B16C = self.modulation(cond_BD) if ada_B16C is None else ada_B16C
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        h_BLC = self.ln_wo_grad(x_BLC).mul(scale1 + 1).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h_BLC, attn_bias=attn_bias, cache=cache).mul_(gamma1))
        h_BLC = self.ln_wo_grad(x_BLC).mul(scale2 + 1).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h_BLC).mul_(gamma2))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """ada_B16C: gamma1, gamma2, scale1, scale2, shift1, shift2 of the condition, stacked on dim 2."""
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C)


class AdaLNBeforeHead(nn.Module):
    """The final adaptive LayerNorm: ``LN(x) * (1 + scale) + shift`` with ``scale, shift = ada_lin(cond)``."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, ada_B12C: torch.Tensor | None = None) -> torch.Tensor:
        """``ada_B12C``: :meth:`modulation` of ``cond_BD`` computed by the caller, or None to compute it here."""
        scale, shift = (self.modulation(cond_BD) if ada_B12C is None else ada_B12C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale + 1).add_(shift)

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """ada_B12C: scale and shift of the condition, stacked on dim 2."""
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.C)
