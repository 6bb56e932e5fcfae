"""VARGPT: one model that understands images (LLaVA) and generates them (VAR next-scale prediction).

Data flow of one training step (VARGPT-REFERENCE.md 2.2, 3, 4, 10):

* understanding: CLIP penultimate-layer patch features -> ``multi_modal_projector`` -> scattered into the
  ``<image>`` token slots of the LLM input;
* generation: target image -> frozen VQ-VAE codes -> VAR teacher-forcing input embeddings (class row
  "generate", 10 % dropped to the null row in training) -> ``image_gen_projector`` -> scattered into the
  ``<|image_gen_pad|>`` slots; the LLM's last (post-norm) hidden states at those slots, unshifted ->
  ``image_gen_projector_out`` -> the VAR blocks with the block-causal mask -> code logits.

A batch may hold understanding and generation samples together: both kinds of features are scattered
(the release drops the generation ones in that case, reference 9.2). The text loss uses the collator's
labels (the release trains on prompts in generation batches, reference 9.1).

No host-device syncs: given the batch's ``BatchCounts`` (Python ints counted on its host copy, which
``VARGPTModule`` adds before the transfer), the training forward and backward read no device value. The slot
check compares those ints, the labelled and gen-pad positions are gathered with ``nonzero_static`` of a
known size (not boolean-mask indexing, whose output size the host would have to wait for), and the LLM gets
its causal + padding mask built here (transformers' own mask builder asks the device whether there is
padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from vargpt.model.config import ImageLossReduction, ModelConfig
from vargpt.model.projectors import GenProjector, UnderstandingProjector
from vargpt.model.var import var_from_config
from vargpt.model.vqvae import vqvae_from_config
from vargpt.tokens import SpecialTokenIds

IGNORE_INDEX = -100
# The batch key of a batch's BatchCounts.
HOST_COUNTS = "host_counts"


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses field by field
class BatchCounts:
    """Counts of a batch that the forward needs as Python ints: its ``<image>`` and ``<|image_gen_pad|>`` slots
    and its labelled next-token positions.

    Counted on the host (CPU) copy of a batch they cost nothing; under ``batch[HOST_COUNTS]`` they spare the
    forward its only device reads. Without them the forward counts on the batch it gets (three host-device
    syncs if that batch is on a GPU).
    """

    image_slots: int
    gen_slots: int
    text_targets: int

    @classmethod
    def of(cls, batch: Mapping[str, Any], ids: SpecialTokenIds) -> BatchCounts:
        ids_BT = batch["input_ids"]
        return cls(
            image_slots=int((ids_BT == ids.image).sum()),
            gen_slots=int((ids_BT == ids.gen_pad).sum()),
            text_targets=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        )


@dataclass
class VARGPTOutput:
    """What one forward returns: the weighted total, each task's loss, and detached metrics for logging."""

    loss: torch.Tensor
    loss_text: torch.Tensor | None
    loss_image: torch.Tensor | None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TeacherForcedPass:
    """The LLM's last hidden states over a batch (B, T, H), its counts, and its generation targets' per-scale
    codes and AdaLN condition (None without generation targets)."""

    hidden: torch.Tensor  # (B, T, H)
    counts: BatchCounts
    codes: list[torch.Tensor] | None  # per scale (N, p_k^2)
    cond: torch.Tensor | None  # (N, D)


class VARGPT(nn.Module):
    """The unified model; sub-module names are those of the released ``VARGPTLlavaForConditionalGeneration``."""

    def __init__(self, cfg: ModelConfig, ids: SpecialTokenIds, tokenizer: Any = None) -> None:
        super().__init__()
        cfg.vqvae.validate()
        self.cfg = cfg
        self.ids = ids
        # Kept for vargpt.inference.generate (prompt building and decoding); not a module, not in the state dict.
        self.tokenizer = tokenizer
        self.vision_tower = CLIPVisionTower(clip_vision_config(cfg))
        self.multi_modal_projector = UnderstandingProjector(
            cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.projector_hidden_act
        )
        self.language_model = AutoModelForCausalLM.from_config(llm_config(cfg))
        self.vae_local = vqvae_from_config(cfg.vqvae)
        # The release sizes the class embedding by the tokenizer: num_classes = gen_start_id + 1, so row
        # gen_start_id is "generate an image" and row gen_start_id + 1 is the null (dropped) condition.
        self.vargpt_gen = var_from_config(cfg, num_classes=ids.gen_start + 1, vqvae=self.vae_local)
        var_dim, llm_dim = self.vargpt_gen.C, cfg.llm.hidden_size
        self.image_gen_projector = GenProjector(var_dim, llm_dim)
        self.image_gen_projector_out = GenProjector(llm_dim, var_dim)
        self.image_gen_projector.init_weights()
        self.image_gen_projector_out.init_weights()
        # The VQ-VAE is a frozen tokenizer in every stage (reference 1.7: test_mode).
        self.vae_local.requires_grad_(False)

    # ------------------------------------------------------------------ facts
    @property
    def num_gen_tokens(self) -> int:
        """L: LLM slots (and VAR tokens) of one generated image."""
        return self.vargpt_gen.schedule.num_tokens

    @property
    def num_image_tokens(self) -> int:
        """LLM slots of one understanding image."""
        return self.cfg.vision.num_image_tokens

    @property
    def gen_label(self) -> int:
        """The class row that conditions generation ("generate an image" = the gen start token id)."""
        return self.ids.gen_start

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one: LLM decoder layers, VAR blocks, vision encoder layers."""
        return [
            *self.language_model.model.layers,
            *self.vargpt_gen.blocks,
            *self.vision_tower.vision_model.encoder.layers,
        ]

    # ------------------------------------------------------------------ parts of the forward
    def image_features(self, pixel_values_N3SS: torch.Tensor) -> torch.Tensor:
        """CLIP patch features of the feature layer (CLS dropped), projected: (N, P, H)."""
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vision_tower.vision_model(pixel_values_N3SS.to(dtype), output_hidden_states=True)
        feats_NPD = out.hidden_states[self.cfg.vision.feature_layer][:, 1:]
        return self.multi_modal_projector(feats_NPD)

    def gen_targets(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-scale VQ codes of the generation targets: precomputed ``gen_codes`` or encoded pixels."""
        if batch.get("gen_codes") is not None:
            codes_NL = batch["gen_codes"]
            return [codes_NL[:, b:e] for b, e in self.vargpt_gen.schedule.begin_end]
        with torch.no_grad():
            return self.vae_local.img_to_codes(batch["pixel_gen_values"])

    def gen_inputs(
        self, codes: list[torch.Tensor], drop_condition: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR input embeddings of the targets (B_g, L, C) and their AdaLN condition (B_g, C); the condition is
        dropped to the null row at VAR's rate when ``drop_condition`` (default: in training)."""
        n = codes[0].shape[0]
        label_B = torch.full((n,), self.gen_label, dtype=torch.long, device=codes[0].device)
        if self.training if drop_condition is None else drop_condition:
            label_B = self.vargpt_gen.drop_labels(label_B)
        cond_BD = self.vargpt_gen.cond(label_B)
        with torch.no_grad():
            teacher_BlCv = self.vae_local.codes_to_teacher_input(codes)
        x_BLC = self.vargpt_gen.embed_teacher(cond_BD, teacher_BlCv.to(cond_BD.dtype))
        return x_BLC, cond_BD

    def build_inputs_embeds(
        self,
        input_ids_BT: torch.Tensor,
        image_feats_NPH: torch.Tensor | None,
        gen_embeds_NLH: torch.Tensor | None,
        counts: BatchCounts | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features and generation inputs scattered into their slots.

        The slot counts are checked against ``counts`` (host ints) or, without them, counted on the ids.
        """
        image_slots, gen_slots = (None, None) if counts is None else (counts.image_slots, counts.gen_slots)
        embeds_BTH = self.language_model.get_input_embeddings()(input_ids_BT)
        embeds_BTH = _scatter(embeds_BTH, input_ids_BT == self.ids.image, image_feats_NPH, image_slots, "<image>")
        return _scatter(embeds_BTH, input_ids_BT == self.ids.gen_pad, gen_embeds_NLH, gen_slots, "<|image_gen_pad|>")

    def llm_hidden(self, inputs_embeds_BTH: torch.Tensor, attention_mask_BT: torch.Tensor | None) -> torch.Tensor:
        """Last hidden state of the LLM after its final norm (causal attention), (B, T, H)."""
        if attention_mask_BT is not None:
            # transformers would build the same boolean mask, after asking the device whether the batch has
            # padding (a host sync); a 4-D mask is taken as it is.
            T = attention_mask_BT.shape[1]
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=attention_mask_BT.device).tril()
            attention_mask_BT = causal_TT[None, None] & attention_mask_BT[:, None, None, :].bool()
        # No KV cache in the teacher-forced pass: nothing reads it, and under activation checkpointing a
        # recomputed layer would append its keys to it a second time.
        out = self.language_model.model(
            inputs_embeds=inputs_embeds_BTH, attention_mask=attention_mask_BT, use_cache=False
        )
        return out.last_hidden_state

    def decode_image_logits(self, hidden_NLH: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """LLM hidden states at the pad slots -> VAR blocks (block-causal) -> code logits (B_g, L, V)."""
        x_BLC = self.image_gen_projector_out(hidden_NLH)
        bias = self.vargpt_gen.attn_bias_for_masking.to(x_BLC.dtype)
        return self.vargpt_gen.decode(x_BLC, cond_BD, attn_bias=bias)

    # ------------------------------------------------------------------ forward
    def teacher_forced(self, batch: dict[str, Any], drop_condition: bool | None = None) -> TeacherForcedPass:
        """The LLM pass of a batch with its images scattered in (the collator's contract: vargpt.data.collate),
        and the generation targets' codes and condition. ``drop_condition``: see :meth:`gen_inputs`."""
        input_ids_BT = batch["input_ids"]
        counts = batch.get(HOST_COUNTS) or BatchCounts.of(batch, self.ids)
        has_und = batch.get("pixel_values") is not None and batch["pixel_values"].shape[0] > 0
        has_gen = batch.get("gen_codes") is not None or (
            batch.get("pixel_gen_values") is not None and batch["pixel_gen_values"].shape[0] > 0
        )
        image_feats = self.image_features(batch["pixel_values"]) if has_und else None
        gen_embeds, cond_BD, codes = None, None, None
        if has_gen:
            codes = self.gen_targets(batch)
            x_BLC, cond_BD = self.gen_inputs(codes, drop_condition)
            gen_embeds = self.image_gen_projector(x_BLC)
        embeds_BTH = self.build_inputs_embeds(input_ids_BT, image_feats, gen_embeds, counts)
        hidden_BTH = self.llm_hidden(embeds_BTH, batch.get("attention_mask"))
        return TeacherForcedPass(hidden_BTH, counts, codes, cond_BD)

    def image_logits(self, batch: dict[str, Any], tf: TeacherForcedPass) -> tuple[torch.Tensor, torch.Tensor]:
        """Code logits of every generation target (N, L, V) and the batch row each target sits in (N,)."""
        b_N, t_N = _positions(batch["input_ids"] == self.ids.gen_pad, tf.counts.gen_slots)
        hidden_NLH = tf.hidden[b_N, t_N].view(-1, self.num_gen_tokens, tf.hidden.shape[-1])
        rows_N = b_N.view(-1, self.num_gen_tokens)[:, 0]
        return self.decode_image_logits(hidden_NLH, tf.cond), rows_N

    def forward(self, batch: dict[str, Any]) -> VARGPTOutput:
        """Teacher-forced losses of a batch (the collator's contract: see vargpt.data.collate), with its
        ``BatchCounts`` under ``HOST_COUNTS`` if the caller has them."""
        tf = self.teacher_forced(batch)
        metrics: dict[str, torch.Tensor] = {}
        loss_text = self.text_loss(tf.hidden, batch["labels"], metrics, tf.counts.text_targets)
        loss_image = None
        if tf.codes is not None:
            logits_NLV, _ = self.image_logits(batch, tf)
            loss_image = self.image_loss(logits_NLV, torch.cat(tf.codes, dim=1), metrics)
        loss = self.cfg.text_loss_weight * loss_text
        if loss_image is not None:
            loss = loss + self.cfg.image_loss_weight * loss_image
        metrics["loss"] = loss.detach()
        return VARGPTOutput(loss=loss, loss_text=loss_text, loss_image=loss_image, metrics=metrics)

    def sequence_logps(self, batch: dict[str, Any], target: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
        """Per batch row, the summed log-probability of its targets under teacher forcing, and how many
        positions the sum covers: both (B,) fp32.

        ``target="image"``: the VQ codes at the row's generation slots (all its ``<image_gen>`` targets), as the
        image loss sees them; ``"text"``: the row's labelled next tokens. The preference stage compares these
        between a chosen and a rejected reply (vargpt.training.preference), so the condition is never dropped
        (the same function of the weights on every call).
        """
        if target not in ("image", "text"):
            raise ValueError(f"target={target!r}: expected image or text")
        tf = self.teacher_forced(batch, drop_condition=False)
        B = batch["input_ids"].shape[0]
        if target == "text":
            targets_BT = batch["labels"][:, 1:]
            b_N, t_N = _positions(targets_BT != IGNORE_INDEX, tf.counts.text_targets)
            logits_NV = self.language_model.lm_head(tf.hidden[b_N, t_N]).float()
            logp_N = -F.cross_entropy(logits_NV, targets_BT[b_N, t_N], reduction="none")
            rows_N, per_row = b_N, 1
        else:
            if tf.codes is None:
                raise ValueError("sequence_logps(target='image'): the batch has no generation targets")
            logits_NLV, rows_N = self.image_logits(batch, tf)
            gt_NL = torch.cat(tf.codes, dim=1)
            logp_N = -F.cross_entropy(logits_NLV.float().transpose(1, 2), gt_NL, reduction="none").sum(1)
            per_row = self.num_gen_tokens
        sums_B = logp_N.new_zeros(B).index_add(0, rows_N, logp_N)
        counts_B = logp_N.new_zeros(B).index_add(0, rows_N, torch.full_like(logp_N, per_row))
        return sums_B, counts_B

    def text_loss(
        self,
        hidden_BTH: torch.Tensor,
        labels_BT: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        num_targets: int,
    ) -> torch.Tensor:
        """Shifted next-token CE over the ``num_targets`` labelled positions only.

        The LM head runs on the positions that carry a label, not on all T: the logits of a 32k vocabulary
        over a 2k-token sequence are the largest activation of the step, and most positions are ignored.
        """
        targets_BT = labels_BT[:, 1:]
        keep_BT = targets_BT != IGNORE_INDEX
        metrics["num_text_tokens"] = keep_BT.sum().detach()
        # Position t of row b predicts its label at t + 1: the hidden state at (b, t) for the target (b, t).
        b_N, t_N = _positions(keep_BT, num_targets)
        logits_NV = self.language_model.lm_head(hidden_BTH[b_N, t_N]).float()
        targets_N = targets_BT[b_N, t_N]
        if num_targets == 0:
            # Nothing to learn from text here; keep the graph connected so every rank runs the same backward.
            loss = logits_NV.sum() * 0.0
            metrics["loss_text"] = loss.detach()
            return loss
        loss = F.cross_entropy(logits_NV, targets_N)
        metrics["loss_text"] = loss.detach()
        metrics["acc_text"] = (logits_NV.argmax(-1) == targets_N).float().mean().detach()
        return loss

    def image_loss(
        self, logits_NLV: torch.Tensor, gt_NL: torch.Tensor, metrics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """CE over the L code positions, uniform (reference 4) or per scale (``cfg.image_loss_reduction``), plus
        per-scale and last-scale ("tail") stats."""
        ce_NL = F.cross_entropy(logits_NLV.float().transpose(1, 2), gt_NL, reduction="none")
        hit_NL = (logits_NLV.argmax(-1) == gt_NL).float()
        schedule = self.vargpt_gen.schedule
        ce_by_scale = [ce_NL[:, b:e].mean() for b, e in schedule.begin_end]
        if self.cfg.image_loss_reduction == ImageLossReduction.scale:
            loss = torch.stack(ce_by_scale).mean()
        else:
            loss = ce_NL.mean()
        # torch.full, not torch.tensor: a fill kernel, not a blocking copy from the host.
        metrics["num_image_tokens"] = torch.full((), gt_NL.numel(), device=gt_NL.device)
        metrics["loss_image"] = loss.detach()
        metrics["acc_image"] = hit_NL.mean().detach()
        for k, (b, e) in enumerate(schedule.begin_end):
            metrics[f"loss_image_s{k}"] = ce_by_scale[k].detach()
            metrics[f"acc_image_s{k}"] = hit_NL[:, b:e].mean().detach()
        last = schedule.num_scales - 1
        metrics["loss_image_tail"] = metrics[f"loss_image_s{last}"]
        metrics["acc_image_tail"] = metrics[f"acc_image_s{last}"]
        return loss


class CLIPVisionTower(nn.Module):
    """transformers' CLIP vision model under ``vision_model``, so keys read ``vision_tower.vision_model.*``.

    This is the one place that absorbs a transformers layout change: 4.x's CLIPVisionModel nests a
    CLIPVisionTransformer under ``.vision_model`` (keys ``vision_model.*``), 5.x flattened it (keys
    ``embeddings.*``). Either way the released ``vision_tower.vision_model.*`` names come out.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        model = CLIPVisionModel(config)
        self.vision_model = getattr(model, "vision_model", model)


def _scatter(
    embeds_BTH: torch.Tensor, slots_BT: torch.Tensor, values: torch.Tensor | None, n_slots: int | None, what: str
) -> torch.Tensor:
    """Put ``values`` (N, P, H) into the ``slots`` of ``embeds`` in row-major order; the slot count
    (``n_slots``, or counted here: a sync on a device batch) must match. ``masked_scatter`` reads nothing back."""
    if n_slots is None:
        n_slots = int(slots_BT.sum())
    n_values = 0 if values is None else values.shape[0] * values.shape[1]
    if n_slots != n_values:
        raise ValueError(
            f"{what}: the batch has {n_slots} token slots but {n_values} feature vectors "
            "(each placeholder must expand to exactly the model's token count, one image per placeholder)"
        )
    if values is None:
        return embeds_BTH
    return embeds_BTH.masked_scatter(slots_BT[..., None], values.to(embeds_BTH.dtype))


def _positions(mask_BT: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the ``n`` true entries of ``mask_BT`` in row-major order, as ``mask.nonzero()``
    would give them, without the host-device sync: the output size is known, not read from the device."""
    return torch.nonzero_static(mask_BT, size=n).unbind(1)


def llm_config(cfg: ModelConfig) -> Any:
    llm = cfg.llm
    return AutoConfig.for_model(
        llm.model_type,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        intermediate_size=llm.intermediate_size,
        vocab_size=llm.vocab_size,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta,
        hidden_act=llm.hidden_act,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **dict(llm.extra),
    )


def clip_vision_config(cfg: ModelConfig) -> CLIPVisionConfig:
    v = cfg.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        projection_dim=v.projection_dim,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
        attn_implementation="sdpa",
    )


def build_vargpt(cfg: ModelConfig, tokenizer_or_ids: Any) -> VARGPT:
    """Build a VARGPT from its config and a tokenizer (or its special ids), checking they fit each other."""
    tokenizer = None if isinstance(tokenizer_or_ids, SpecialTokenIds) else tokenizer_or_ids
    ids = tokenizer_or_ids if tokenizer is None else SpecialTokenIds.from_tokenizer(tokenizer)
    n_tok = max(ids.image, ids.pad, ids.gen_start, ids.gen_end, ids.gen_pad, ids.eos) + 1
    if tokenizer is not None:
        n_tok = max(n_tok, len(tokenizer))
    if n_tok > cfg.llm.vocab_size:
        raise ValueError(
            f"model.llm.vocab_size={cfg.llm.vocab_size} is smaller than the tokenizer ({n_tok} tokens); "
            "raise it (the release pads the embedding to 32064 rows)"
        )
    return VARGPT(cfg, ids, tokenizer)
