"""Model FLOPs of a training step, counted from the model and the batch: the numerator of MFU.

The one FLOP count of the project: the training throughput monitor (``vargpt.training.callbacks``) and the
bench scripts (``bench/train_step.py``, ``bench/var_step.py``) both use it. It imports nothing beyond torch, so
the bench scripts run without Lightning. ``VARGPTFlops(model)(shape)`` for VARGPT micro batches under the
model's current ``requires_grad`` (the stage's trainable set), ``VARFlops(var)(B)`` for the class-conditional
VAR decoder step; both return a ``FlopCount`` (forward/backward per part). A ``BatchShape`` is additive and the
count is linear in it, so the FLOPs of a log interval are those of the summed shapes of its micro batches.

**What MFU counts**: the multiply-accumulates a step needs to do on useful tokens, whatever kernels run them.

The rule (2 FLOPs per multiply-accumulate; N_c = multiply-accumulates of part c's weight matrices per token)::

    forward                                   2 N_c                      every part that runs
    backward, gradient w.r.t. activations     2 N_c                      only where a gradient flows through c:
                                                                         c holds a trainable weight, or a part
                                                                         upstream of c does
    backward, gradient w.r.t. weights         2 N_c(trainable)           only c's trainable weights

so a trained part costs 6N per token (the usual "6N rule"), a frozen part on the gradient path 4N (stage 1 and
3 back-propagate through the frozen 7B LLM to reach the generation projectors), a frozen part off it 2N (the
vision tower). Attention has no weights; per layer and sequence its forward is ``4 * d * pairs`` (QK^T and
AV, d = heads x head_dim) and its backward twice that where a gradient flows, with ``pairs`` the
query-key pairs the mask lets through:

    LLM (causal)                 sum over rows of n(n+1)/2, n = the row's real (unpadded) tokens
    vision tower (bidirectional) (P+1)^2 per image (P patches + CLS)
    VAR decoder (block-causal)   sum_k p_k^2 * (p_0^2 + ... + p_k^2) per image (a token sees its own and
                                 every coarser scale: 286,434 pairs of 680^2 = 462,400 at 256 px)

Tokens per part: the LLM counts real tokens only (padding is waste, not work: length grouping shows up as
MFU), the LM head only the labelled positions (the model runs it on those alone), the vision tower P+1 per
understanding image, the generation projectors and VAR blocks L per generated image. VAR's AdaLN projections
(``ada_lin``: 6C x C per block) act on the condition vector once per image, not per token, so they count per
image (the official VAR throughput figures, and ``6 * params * tokens``, count them per token: see
``VARFlops.reference_6n``).

Not counted: embedding lookups, norms, activations, softmax, the losses, the optimizer update (about 10-20
FLOPs per trainable parameter, element-wise), and recomputation (activation checkpointing, flash attention's
backward): this is model FLOPs (MFU), not hardware FLOPs (HFU). The frozen VQ-VAE that turns target pixels
into codes is a tokenizer: its forward FLOPs are reported apart (``FlopCount.excluded``) and not in MFU, so
that precomputed codes show up as a higher MFU.

Against torch's ``FlopCounterMode`` (which counts the matmuls and convolutions that actually run;
``tests/test_training_flops.py``): the weight terms agree part by part, up to (a) the input gradient of a first
layer whose input needs none (the VAR ``word_embed`` on the teacher input: autograd skips it, the rule counts
it), (b) padding, which the counter counts as LLM work and this count does not, (c) attention, which the
counter sees only as its math kernel's full T x T products (the mask's skipped pairs included), or not at all
for fused CPU kernels, and (d) the VQ-VAE's convolutions, which the counter counts and MFU does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Part:
    """A component of the data flow: the parameters under ``prefixes`` and the parts that feed it."""

    prefixes: tuple[str, ...]
    upstream: tuple[str, ...] = ()


# VARGPT's data flow (VARGPT-REFERENCE.md 2.2): pixels -> vision -> projector -> LLM; codes -> VAR input
# embeddings -> gen projector -> LLM -> gen projector out -> VAR blocks (which also take the class condition).
VARGPT_PARTS: dict[str, Part] = {
    "vision_patch": Part(("vision_tower.vision_model.embeddings",)),
    "vision_tower": Part(("vision_tower",), ("vision_patch",)),
    "multi_modal_projector": Part(("multi_modal_projector",), ("vision_tower",)),
    "var_embed": Part(
        tuple(f"vargpt_gen.{n}" for n in ("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed"))
    ),
    "image_gen_projector": Part(("image_gen_projector",), ("var_embed",)),
    "language_model": Part(("language_model.model",), ("multi_modal_projector", "image_gen_projector")),
    "lm_head": Part(("language_model.lm_head",), ("language_model",)),
    "image_gen_projector_out": Part(("image_gen_projector_out",), ("language_model",)),
    "var_blocks": Part(
        ("vargpt_gen.blocks", "vargpt_gen.head_nm", "vargpt_gen.head"), ("image_gen_projector_out", "var_embed")
    ),
}

# The class-conditional VAR alone (names relative to the VAR module).
VAR_PARTS: dict[str, Part] = {
    "var_embed": Part(("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed")),
    "var_blocks": Part(("blocks", "head_nm", "head"), ("var_embed",)),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def causal_pairs(n: int) -> int:
    """Query-key pairs of causal attention over n tokens (the diagonal included)."""
    return n * (n + 1) // 2


def block_causal_pairs(patch_nums: Sequence[int]) -> int:
    """Query-key pairs of VAR's block-causal mask: a token of scale k sees every token of scales <= k."""
    pairs = cum = 0
    for p in patch_nums:
        cum += p * p
        pairs += p * p * cum
    return pairs


@dataclass
class PartWeights:
    """Multiply-accumulates of one part's weight matrices, per token and per sample (AdaLN), all/trainable."""

    per_token: int = 0
    per_token_trained: int = 0
    per_sample: int = 0
    per_sample_trained: int = 0
    params: int = 0
    trainable: bool = False


@dataclass
class FlopCount:
    """FLOPs of one micro batch: ``parts[name] = (forward, backward)``; ``excluded``: not in MFU."""

    parts: dict[str, tuple[float, float]] = field(default_factory=dict)
    excluded: dict[str, float] = field(default_factory=dict)

    @property
    def forward(self) -> float:
        return sum(f for f, _ in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(b for _, b in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: FlopCount) -> FlopCount:
        parts = dict(self.parts)
        for k, (f, b) in other.parts.items():
            f0, b0 = parts.get(k, (0.0, 0.0))
            parts[k] = (f0 + f, b0 + b)
        excluded = dict(self.excluded)
        for k, v in other.excluded.items():
            excluded[k] = excluded.get(k, 0.0) + v
        return FlopCount(parts, excluded)

    def rows(self) -> list[list[str]]:
        """Table rows: part, forward GFLOP, backward GFLOP, share of the total."""
        total = max(self.total, 1e-30)
        out = [
            [k, f"{f / 1e9:,.3f}", f"{b / 1e9:,.3f}", f"{100 * (f + b) / total:.1f}"]
            for k, (f, b) in self.parts.items()
            if f + b > 0
        ]
        out.append(["total", f"{self.forward / 1e9:,.3f}", f"{self.backward / 1e9:,.3f}", "100.0"])
        for k, v in self.excluded.items():
            out.append([f"({k}, not in MFU)", f"{v / 1e9:,.3f}", "0", "-"])
        return out


class ModelFlops:
    """Per-part weights and gradient flow of a model under its current ``requires_grad`` flags."""

    def __init__(self, model: nn.Module, parts: Mapping[str, Part], per_sample_module: str = "ada_lin") -> None:
        self.parts = dict(parts)
        self.weights = {name: PartWeights() for name in self.parts}
        prefixes = [(p, name) for name, part in self.parts.items() for p in part.prefixes]
        for mod_name, module in model.named_modules():
            per_sample = per_sample_module in mod_name.split(".")
            for leaf, param in module.named_parameters(recurse=False):
                full = f"{mod_name}.{leaf}" if mod_name else leaf
                matches = [(len(p), name) for p, name in prefixes if _under(full, p)]
                if not matches:
                    continue
                w = self.weights[max(matches)[1]]
                w.params += param.numel()
                w.trainable |= param.requires_grad
                # Lookup tables, norms and biases cost no multiply-accumulates per token; Linear weights do,
                # and so does a patch convolution per output position (one per token).
                if leaf != "weight" or not isinstance(module, nn.Linear | nn.Conv2d):
                    continue
                n = param.numel()
                if per_sample:
                    w.per_sample += n
                    w.per_sample_trained += n * param.requires_grad
                else:
                    w.per_token += n
                    w.per_token_trained += n * param.requires_grad
        self.grad_flows = {name: self._grad_flows(name) for name in self.parts}

    def _grad_flows(self, name: str) -> bool:
        """A gradient passes through ``name``: it or any part upstream of it holds a trainable weight."""
        if self.weights[name].trainable:
            return True
        return any(self._grad_flows(u) for u in self.parts[name].upstream)

    @property
    def num_params(self) -> int:
        return sum(w.params for w in self.weights.values())

    @property
    def num_trainable_params(self) -> int:
        return sum(w.per_token_trained + w.per_sample_trained for w in self.weights.values())

    def cost(self, name: str, tokens: float, samples: float = 0.0, attn_fwd: float = 0.0) -> tuple[float, float]:
        """(forward, backward) FLOPs of part ``name`` over ``tokens`` tokens of ``samples`` samples."""
        w = self.weights[name]
        fwd = 2.0 * (w.per_token * tokens + w.per_sample * samples) + attn_fwd
        bwd = 2.0 * (w.per_token_trained * tokens + w.per_sample_trained * samples)
        if self.grad_flows[name]:
            bwd += 2.0 * (w.per_token * tokens + w.per_sample * samples) + 2.0 * attn_fwd
        return fwd, bwd


# The BatchShape fields that token_counts gives, in its order (the others come from tensor sizes).
TOKEN_COUNT_FIELDS = ("real_tokens", "llm_pairs", "num_labels")


def token_counts(batch: Mapping[str, Any]) -> torch.Tensor:
    """(real tokens, causal query-key pairs, labelled positions) of a batch: int64 (3,) on the batch's device.

    Tensor ops only, nothing read back: on a GPU batch it queues a few small kernels and never waits for them
    (the throughput monitor sums these per micro batch and reads the sum once per log interval).
    """
    ids_BT = batch["input_ids"]
    mask_BT = batch.get("attention_mask")
    if mask_BT is None:
        n_B = torch.full((ids_BT.shape[0],), ids_BT.shape[1], dtype=torch.long, device=ids_BT.device)
    else:
        n_B = mask_BT.sum(1, dtype=torch.long)
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    return torch.stack([n_B.sum(), (n_B * (n_B + 1) // 2).sum(), labelled])


@dataclass(frozen=True)
class BatchShape:
    """What the FLOP count needs from a batch in the collator's contract. Every field is a sum over rows or
    images, so the shape of several micro batches is the sum of theirs (``+``), and so is their FLOP count."""

    samples: int = 0
    padded_tokens: int = 0  # B x T: what the LLM runs on, padding included
    real_tokens: int = 0  # attention-mask ones: the useful LLM tokens
    llm_pairs: int = 0  # causal query-key pairs over each row's real tokens, summed over rows
    num_labels: int = 0  # positions with a next-token label: the rows the LM head runs on
    num_und_images: int = 0
    num_gen_images: int = 0
    num_gen_encoded: int = 0  # generation targets given as pixels (the VQ-VAE encodes them in the step)

    @classmethod
    def sizes(cls, batch: Mapping[str, Any]) -> BatchShape:
        """The fields that tensor sizes give, without reading any tensor; the token fields are left at 0."""
        ids_BT = batch["input_ids"]
        und, gen, codes = batch.get("pixel_values"), batch.get("pixel_gen_values"), batch.get("gen_codes")
        n_gen = codes.shape[0] if codes is not None else (0 if gen is None else gen.shape[0])
        return cls(
            samples=ids_BT.shape[0],
            padded_tokens=ids_BT.numel(),
            num_und_images=0 if und is None else und.shape[0],
            num_gen_images=n_gen,
            num_gen_encoded=n_gen if codes is None else 0,
        )

    def with_tokens(self, counts: Sequence[int]) -> BatchShape:
        """This shape with the token fields set from ``token_counts`` values (read on the host)."""
        return replace(self, **{f: int(c) for f, c in zip(TOKEN_COUNT_FIELDS, counts, strict=True)})

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> BatchShape:
        """Sizes and token counts of a batch. Reads the counts back: call it on the host copy of the batch
        (on a GPU batch it is a host-device sync)."""
        return cls.sizes(batch).with_tokens(token_counts(batch).tolist())

    def __add__(self, other: BatchShape) -> BatchShape:
        return BatchShape(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


class VARGPTFlops:
    """Model FLOPs of a VARGPT micro batch for the model's current trainable set (see the module docstring).

    Build it after the stage is applied (``requires_grad`` decides the backward terms). ``vq_encode_flops``:
    forward FLOPs of the VQ-VAE per target image (``measure_flops``), reported apart when the batch carries
    pixels instead of precomputed ``gen_codes``.
    """

    def __init__(self, model: nn.Module, vq_encode_flops: float = 0.0) -> None:
        self.m = ModelFlops(model, VARGPT_PARTS)
        cfg = model.cfg
        lm_cfg = model.language_model.config
        heads = lm_cfg.num_attention_heads
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // heads
        self.llm_layers, self.llm_attn_dim = lm_cfg.num_hidden_layers, heads * head_dim
        self.vis_layers, self.vis_dim = cfg.vision.num_hidden_layers, cfg.vision.hidden_size
        self.P = cfg.vision.num_image_tokens
        var = model.vargpt_gen
        self.var_layers, self.var_dim = len(var.blocks), var.C
        self.L, self.first_l = var.schedule.num_tokens, var.schedule.tokens_per_scale[0]
        self.var_pairs = block_causal_pairs(var.schedule.patch_nums)
        self.vq_encode_flops = vq_encode_flops

    def __call__(self, batch: Mapping[str, Any] | BatchShape) -> FlopCount:
        """FLOPs of a batch (read on the host: see ``BatchShape.from_batch``) or of a ``BatchShape``, which may
        be the sum of several micro batches' shapes."""
        s = batch if isinstance(batch, BatchShape) else BatchShape.from_batch(batch)
        m, n_und, n_gen = self.m, s.num_und_images, s.num_gen_images
        vis_tokens = self.P + 1
        parts = {
            "vision_patch": m.cost("vision_patch", n_und * self.P),
            "vision_tower": m.cost(
                "vision_tower",
                n_und * vis_tokens,
                attn_fwd=4.0 * self.vis_layers * self.vis_dim * vis_tokens**2 * n_und,
            ),
            "multi_modal_projector": m.cost("multi_modal_projector", n_und * self.P),
            "var_embed": m.cost("var_embed", n_gen * (self.L - self.first_l)),
            "image_gen_projector": m.cost("image_gen_projector", n_gen * self.L),
            "language_model": m.cost(
                "language_model", s.real_tokens, attn_fwd=4.0 * self.llm_layers * self.llm_attn_dim * s.llm_pairs
            ),
            "lm_head": m.cost("lm_head", s.num_labels),
            "image_gen_projector_out": m.cost("image_gen_projector_out", n_gen * self.L),
            "var_blocks": m.cost(
                "var_blocks",
                n_gen * self.L,
                samples=n_gen,
                attn_fwd=4.0 * self.var_layers * self.var_dim * self.var_pairs * n_gen,
            ),
        }
        excluded = {}
        if self.vq_encode_flops and s.num_gen_encoded:
            excluded["vq_encode"] = self.vq_encode_flops * s.num_gen_encoded
        return FlopCount(parts, excluded)


class VARFlops:
    """Model FLOPs of the class-conditional VAR training step (teacher forcing over all L tokens)."""

    def __init__(self, var: nn.Module) -> None:
        self.m = ModelFlops(var, VAR_PARTS)
        self.layers, self.dim = len(var.blocks), var.C
        self.L, self.first_l = var.schedule.num_tokens, var.schedule.tokens_per_scale[0]
        self.pairs = block_causal_pairs(var.schedule.patch_nums)
        self.num_params = sum(p.numel() for p in var.parameters())

    def __call__(self, batch_size: int, backward: bool = True) -> FlopCount:
        B = batch_size
        parts = {
            "var_embed": self.m.cost("var_embed", B * (self.L - self.first_l)),
            "var_blocks": self.m.cost(
                "var_blocks", B * self.L, samples=B, attn_fwd=4.0 * self.layers * self.dim * self.pairs * B
            ),
        }
        if not backward:
            parts = {k: (f, 0.0) for k, (f, _) in parts.items()}
        return FlopCount(parts)

    def reference_6n(self, batch_size: int) -> float:
        """``6 x all parameters x B x L``: the convention of the official VAR MFU figures the issue quotes
        (145.6 k tokens/s at MFU 27 % for d16 on an H200 is 6 x 310 M x 145.6 k / 989 TFLOP/s), with AdaLN
        and the head counted per token and no attention term."""
        return 6.0 * self.num_params * batch_size * self.L


def measure_flops(fn: Any, *args: Any, **kwargs: Any) -> float:
    """FLOPs of ``fn(*args, **kwargs)`` from torch's FlopCounterMode (matmuls and convolutions; on a CPU it
    does not see fused attention kernels). Used for the convolutional VQ-VAE."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


def describe_parts(m: ModelFlops) -> list[list[str]]:
    """Table rows: part, parameters, trainable?, gradient flows?, per-token / per-sample MACs (millions)."""
    return [
        [
            name,
            f"{w.params / 1e6:,.2f}",
            "yes" if w.trainable else "no",
            "yes" if m.grad_flows[name] else "no",
            f"{w.per_token / 1e6:,.2f}",
            f"{w.per_sample / 1e6:,.2f}",
        ]
        for name, w in m.weights.items()
    ]


__all__ = [
    "VARGPT_PARTS",
    "VAR_PARTS",
    "TOKEN_COUNT_FIELDS",
    "BatchShape",
    "FlopCount",
    "ModelFlops",
    "Part",
    "VARFlops",
    "VARGPTFlops",
    "block_causal_pairs",
    "causal_pairs",
    "describe_parts",
    "measure_flops",
    "token_counts",
]
