"""One scale of next-scale generation, shared by class-conditional ``VAR.sample`` and VARGPT's mixed-modal decoder.

Per scale k (VARGPT-REFERENCE.md 2.3): the VAR decoder's blocks and head over the scale's input (with guidance the
conditional rows first, then as many unconditional rows), the guidance mix ``(1 + t) * cond - t * uncond``, one
code per position drawn with each sample's own generator (:func:`vargpt.model.sampling.pick_codes`), the caller's
forced codes where it has them (teacher forcing), the VQ-VAE's ``next_input`` and the embedding of scale k+1's
input. The two callers differ only in what they feed the decoder: VAR its own embeddings of that input, VARGPT
the LLM's hidden states over it, projected back to VAR's width.

The fast paths (:class:`ScaleStepOptions`, each switchable; docs/performance.md has the figures): the AdaLN
modulations once per image instead of once per scale, a preallocated KV cache written in place, top-k / top-p
without a full sort, and, off by default, bf16 autocast of the blocks and ``torch.compile`` of the per-scale
decoder (one graph per scale size, ``fullgraph=True``; ``reduce-overhead`` puts each scale in a CUDA graph).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from vargpt.model.sampling import pick_codes
from vargpt.model.var_blocks import VARKVCache

if TYPE_CHECKING:  # var.py imports this module for VAR.sample
    from vargpt.model.var import VAR, AdaLNConditions

# torch.compile modes of the per-scale decoder; "off" runs it eagerly.
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that put the compiled graphs in CUDA graphs (on a GPU; on a CPU inductor alone).
CUDA_GRAPH_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")
# One graph per scale and batch size: room for a few batch sizes of a 10-scale schedule before dynamo gives up.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ScaleStepOptions:
    """Which fast paths the scale step takes. The defaults (the exact ones) keep fp32 codes equal to the plain
    path's; the others are off by default.

    Args:
        cache_adaln: compute every block's AdaLN modulation once per image (same values, fewer matmuls).
        static_cache: a KV cache preallocated for the image's L tokens and written in place (same values).
        fast_filter: top-k / top-p from ``topk(k, sorted=True)`` instead of a sort of all V logits. The same
            codes except on exact fp32 ties at a cut (:func:`vargpt.model.sampling.filter_top_k_top_p_fast`):
            about one row in a few thousand, after which the image's later scales differ (docs/performance.md).
        bf16: run the blocks under bf16 autocast (the head stays in the weights' dtype). Faster on CPUs with
            AVX512-BF16/AMX and on GPUs, but the codes are not fp32's: see docs/performance.md.
        compile: ``torch.compile`` mode of the per-scale decoder (one of COMPILE_MODES; needs ``static_cache``).
    """

    cache_adaln: bool = True
    static_cache: bool = True
    fast_filter: bool = False
    bf16: bool = False
    compile: str = "off"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r}: one of {', '.join(COMPILE_MODES)}")
        if self.compile != "off" and not self.static_cache:
            raise ValueError("compile needs static_cache=True (static shapes and buffer addresses per scale)")

    @classmethod
    def plain(cls) -> ScaleStepOptions:
        """Every fast path off: the scale step as it was before them (a reference in tests and benchmarks)."""
        return cls(cache_adaln=False, static_cache=False, fast_filter=False, bf16=False, compile="off")


def guided_logits(
    var: VAR,
    x_RlC: torch.Tensor,
    cond_RD: torch.Tensor,
    cache: VARKVCache,
    ada: AdaLNConditions | None,
    ratio: float | None,
) -> torch.Tensor:
    """The decoder over one scale, then the guidance mix ``(1 + t) * cond - t * uncond`` (rows: the conditional
    half first) unless ``ratio`` is None: logits_BlV (fp32). The region ``torch.compile`` captures."""
    logits_RlV = var.decode(x_RlC, cond_RD, attn_bias=None, cache=cache, ada=ada)
    if ratio is None:
        return logits_RlV
    B = logits_RlV.shape[0] // 2
    return (1 + ratio) * logits_RlV[:B] - ratio * logits_RlV[B:]


@functools.cache
def compiled_guided_logits(mode: str) -> Callable[..., torch.Tensor]:
    """:func:`guided_logits` under ``torch.compile(mode)``: static shapes, so one graph per scale (and batch
    size), and no graph break (``fullgraph=True``); compiled once per process and mode."""
    return torch.compile(guided_logits, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)


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
        options: the fast paths (None: the defaults of :class:`ScaleStepOptions`).
    """

    def __init__(
        self,
        var: VAR,
        vqvae: NextInputVQVAE,
        ratios: Sequence[float] | None,
        top_k: int,
        top_p: float,
        generators: Sequence[torch.Generator],
        options: ScaleStepOptions | None = None,
    ) -> None:
        self.var, self.vqvae, self.ratios = var, vqvae, ratios
        self.top_k, self.top_p, self.generators = top_k, top_p, list(generators)
        self.options = ScaleStepOptions() if options is None else options
        self.cache = VARKVCache()  # replaced by a preallocated one at the first step under static_cache
        self.f_hat: torch.Tensor | None = None  # the image so far in VQ-VAE feature space; decode it at the end
        self._ada: tuple[torch.Tensor, AdaLNConditions] | None = None  # (condition, its modulations)
        mode = self.options.compile
        self._logits_fn = guided_logits if mode == "off" else compiled_guided_logits(mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast under ``options.bf16``, else nothing. Every step enters it; a caller that also holds it
        around its whole scale loop keeps autocast's bf16 copies of the weights for all scales (leaving the
        outermost autocast region drops them, so per step they would be cast again at every scale)."""
        if self.options.bf16:
            return torch.autocast(self.var.head.weight.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, x_RlC: torch.Tensor, cond_RD: torch.Tensor) -> AdaLNConditions | None:
        """The preallocated cache at the first scale, and the AdaLN modulations of ``cond_RD`` (computed again
        only when the caller passes another condition tensor). Runs under the step's autocast state."""
        if self.options.static_cache and self.cache.capacity is None:
            graphs = self.options.compile in CUDA_GRAPH_MODES
            # CUDA graphs replay on fixed addresses: the same buffers for every image of this size
            self.cache = self.var.new_kv_cache(x_RlC.shape[0], x_RlC.device, reuse=graphs)
            if self.options.compile != "off":  # the buffers are mutated inputs of every scale's (CUDA) graph
                for k_buf, v_buf in self.cache.layers:
                    torch._dynamo.mark_static_address(k_buf)
                    torch._dynamo.mark_static_address(v_buf)
            if graphs:  # a new image: the previous image's graph outputs may be overwritten from here on
                torch.compiler.cudagraph_mark_step_begin()
        if not self.options.cache_adaln:
            return None
        if self._ada is None or self._ada[0] is not cond_RD:
            self._ada = (cond_RD, self.var.adaln_conditions(cond_RD))
        return self._ada[1]

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
        ratio = None if self.ratios is None else self.ratios[k]
        with self.autocast(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            ada = self._prepare(x_RlC, cond_RD)
            logits_BlV = self._logits_fn(self.var, x_RlC, cond_RD, self.cache, ada, ratio)
        codes_Bl = pick_codes(logits_BlV, self.top_k, self.top_p, self.generators, self.options.fast_filter)
        for i, codes_l in enumerate(forced):
            if codes_l is not None:
                codes_Bl[i] = codes_l.to(codes_Bl).view(-1)
        # options.bf16 is about the VAR blocks: the VQ-VAE's phi convolutions stay out of its autocast region.
        with torch.autocast(codes_Bl.device.type, enabled=False) if self.options.bf16 else contextlib.nullcontext():
            self.f_hat, next_BlCvae = self.vqvae.next_input(k, self.f_hat, codes_Bl)
        next_x_BlC = None if next_BlCvae is None else self.var.embed_scale(k + 1, next_BlCvae)
        return ScaleOutput(codes_Bl, logits_BlV, next_x_BlC)
