"""Row and column surgery on the LLM's KV cache (an HF ``DynamicCache``) for the mixed-modal decoder.

The decoder picks rows (samples) for an image group, pads the waiting rows with masked holes, stacks the
null-prompt rows under the conditional ones, and cuts the columns (positions) nobody attends to any more.
:class:`LLMState` keeps the cache with its 2D attention mask and each row's next position.
transformers >= 4.54 keeps per-layer ``layers[i].keys/.values``; 4.4x kept ``key_cache``/``value_cache`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


def cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer, each (rows, heads, columns, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A cache holding the given (keys, values) of every layer."""
    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(kv))
    return DynamicCache(kv)


def new_cache() -> Any:
    """An empty cache for a prefill."""
    return DynamicCache()


def cache_index(cache: Any, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Any:
    """A new cache holding the given rows and/or columns (positions) of every layer."""
    kv = []
    for k, v in cache_kv(cache):
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        if cols is not None:
            k, v = k.index_select(2, cols), v.index_select(2, cols)
        kv.append((k, v))
    return make_cache(kv)


def _cache_pad_left(cache: Any, n: int) -> Any:
    if n == 0:
        return cache
    return make_cache([(_pad_dim2(k, n, 0), _pad_dim2(v, n, 0)) for k, v in cache_kv(cache)])


def _pad_dim2(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    shape = list(x.shape)
    parts = []
    if left:
        parts.append(x.new_zeros(shape[:2] + [left] + shape[3:]))
    parts.append(x)
    if right:
        parts.append(x.new_zeros(shape[:2] + [right] + shape[3:]))
    return torch.cat(parts, dim=2) if len(parts) > 1 else x


def _cache_cat_rows(a: Any, b: Any) -> Any:
    return make_cache(
        [
            (torch.cat((ka, kb)), torch.cat((va, vb)))
            for (ka, va), (kb, vb) in zip(cache_kv(a), cache_kv(b), strict=True)
        ]
    )


def cache_merge_rows(full: Any, sub: Any, rows: torch.Tensor) -> Any:
    """``full`` (N rows, T columns) grown to ``sub``'s length: its ``rows`` replaced by ``sub``, the rest padded."""
    kv = []
    for (kf, vf), (ks, vs) in zip(cache_kv(full), cache_kv(sub), strict=True):
        grow = ks.shape[2] - kf.shape[2]
        kf, vf = _pad_dim2(kf, 0, grow), _pad_dim2(vf, 0, grow)
        kf[rows], vf[rows] = ks, vs
        kv.append((kf, vf))
    return make_cache(kv)


def attention_mask_4d(mask_BT: torch.Tensor, q: int) -> torch.Tensor:
    """The (B, 1, q, T) boolean SDPA mask of ``q`` new tokens, the last ``q`` of the T columns of ``mask_BT``:
    query i sees the real tokens (mask 1) up to its own column. It is what transformers builds from the 2D mask
    (a 4D mask is taken as it is), without its per-call mask functions."""
    T = mask_BT.shape[1]
    causal_qT = torch.ones(q, T, dtype=torch.bool, device=mask_BT.device).tril(T - q)
    return mask_BT.bool()[:, None, None, :] & causal_qT


@dataclass
class LLMState:
    """LLM cache of a set of rows: the 2D attention mask over its columns and each row's next position."""

    cache: Any
    mask: torch.Tensor  # (n, T) long: 1 = a real token, 0 = padding or a hole
    pos: torch.Tensor  # (n,) long: the next token's position id (real tokens so far)

    def rows(self, idx: torch.Tensor) -> LLMState:
        return LLMState(cache_index(self.cache, rows=idx), self.mask[idx], self.pos[idx])

    def compact(self) -> LLMState:
        """Cut the columns every row masks (left padding of dropped rows, holes of waiting rows)."""
        keep = self.mask.any(dim=0)
        if bool(keep.all()):
            return self
        cols = keep.nonzero().view(-1)
        return LLMState(cache_index(self.cache, cols=cols), self.mask[:, cols], self.pos)


def cat_states(a: LLMState, b: LLMState) -> LLMState:
    """Stack two row sets; the shorter is left-padded with masked columns (positions are per row)."""
    Ta, Tb = a.mask.shape[1], b.mask.shape[1]
    T = max(Ta, Tb)
    ca, cb = _cache_pad_left(a.cache, T - Ta), _cache_pad_left(b.cache, T - Tb)
    ma = torch.cat((a.mask.new_zeros(a.mask.shape[0], T - Ta), a.mask), dim=1)
    mb = torch.cat((b.mask.new_zeros(b.mask.shape[0], T - Tb), b.mask), dim=1)
    return LLMState(_cache_cat_rows(ca, cb), torch.cat((ma, mb)), torch.cat((a.pos, b.pos)))
