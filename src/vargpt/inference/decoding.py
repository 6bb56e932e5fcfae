"""Batched, KV-cached mixed-modal decoding: a reply may hold text, images and more text.

``generate(model, conversations, images, sampling)`` takes a batch of conversations, builds each prompt with the
processor (:mod:`vargpt.inference.processor`, two prompt formats), left-pads them and decodes the assistant
replies together (VARGPT-REFERENCE.md 2.3, 9.3, 9.6, 9.7).

Decoding:

* text: one LLM forward per step over the active rows, continuing the LLM's KV cache (HF ``DynamicCache``,
  reshaped by :mod:`vargpt.inference.kv_cache`); greedy or temperature sampling; an ``<|image_gen_start|>``
  sampled by the model (or forced by the caller) starts an image;
* image: K chunked LLM forwards (one per scale; the first also carries the start token) continue the same
  cache; the hidden states go through ``image_gen_projector_out`` into the VAR decoder, whose per-scale step
  (:class:`vargpt.model.scale_step.ScaleSampler`, the one class-conditional ``VAR.sample`` also uses) keeps its
  own KV cache at batch 2n for classifier-free guidance, samples codes per scale (top-k / top-p, ramped CFG) and
  gives the next scale's input through the VQ-VAE's ``next_input``; the VQ-VAE decodes the image. Then
  ``<|image_gen_end|>`` is fed and text decoding continues, which the release never does;
* rows that sampled ``<|image_gen_start|>`` in the same step make one image group; the other rows wait
  (their cache rows get masked holes, no compute); finished rows (eos, stop string, ``max_new_tokens``) are
  dropped from the caches, and columns masked for every remaining row are cut;
* every sample has its own ``torch.Generator`` (seed + i), used only for its own draws, so a batched call
  gives the same result as one call per sample;
* the speed switches are one :class:`vargpt.inference.fast_paths.FastPaths` (``fast_paths=``; all off: the plain path).

The unconditional CFG branch is configurable (``SamplingConfig.uncond``): ``release`` reproduces the released
inference (N(0, I) noise in place of the LLM hidden states, null class row for both halves), ``null_prompt``
runs a real LLM pass on an empty instruction (its rows join the LLM batch, so a scale is still one forward),
``none`` turns guidance off.

Deviations from the release, all deliberate: batch size > 1; ``<|image_gen_end|>`` and text after the image;
images returned, not written to a fixed path; seeded per-sample generators; the start token's forward is
merged into the first scale's (K LLM forwards per image, not K + 1, no duplicated post-start token); only
the last hidden state is kept (the release requested all 33 at every scale); tokens that are never valid
output (``<image>``, ``<pad>``, ``<|image_gen_pad|>``, ``<|image_gen_end|>``, and ``<|image_gen_start|>``
once the image budget is used) and the padded embedding rows past the tokenizer are masked before text
sampling.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vargpt.inference.fast_paths import FastPaths
from vargpt.inference.kv_cache import (
    LLMState,
    attention_mask_4d,
    cache_kv,
    cache_merge_rows,
    cat_states,
    make_cache,
    new_cache,
)
from vargpt.inference.outputs import GenerationOutput, GenerationStats, ReplyProgress, tensor_to_pil
from vargpt.inference.processor import PROMPT_FORMATS, Prompt, as_conversations, null_prompt_ids, prepare_prompt
from vargpt.model.sampling import cfg_ratio, filter_top_k_top_p, inverse_cdf
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.scale_step import ScaleSampler
from vargpt.tokens import IMAGE_GEN_PLACEHOLDER

LogitsProcessor = Callable[[list[int], list[list[int]], torch.Tensor], torch.Tensor]


@torch.no_grad()
def generate(
    model: nn.Module,
    conversations: Any,
    images: Sequence[Any] | None = None,
    sampling: SamplingConfig | dict[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    system: str | None = None,
    force_image: bool | Sequence[bool] = False,
    seeds: Sequence[int] | None = None,
    logits_processor: LogitsProcessor | None = None,
    image_codes: Sequence[Sequence[torch.Tensor] | None] | None = None,
    return_image_logits: bool = False,
    return_pil: bool = True,
    stats: GenerationStats | None = None,
    prompt_format: str = "training",
    past_max_positions: bool = False,
    fast_paths: FastPaths | None = None,
) -> list[GenerationOutput]:
    """Generate the assistant's reply (text and images) for every conversation of a batch.

    Args:
        model: a ``VARGPT`` (run in eval mode for the call; its modes are restored afterwards).
        conversations: a prompt string, a list of ``{role, content}`` messages, a record ``{messages,
            images}``, or a list of those (one per sample). ``<image>`` in a user turn marks an input image;
            ``<image_gen>`` in an earlier assistant turn marks an image the model made before (it is re-encoded
            with the VQ-VAE and fed as in training). The last turn must be the user's.
        images: per conversation, its images in placeholder order (a list, one image, or None): PIL RGB
            images, file paths, or preprocessed tensors ((3, S, S) CLIP-normalised for ``<image>``,
            (3, R, R) in [-1, 1] for ``<image_gen>``). A record's own ``images`` are used when this is None.
        sampling: a :class:`SamplingConfig`, a dict of its keys, or None for the release's defaults.
        tokenizer: overrides ``model.tokenizer``.
        system: the system prompt (None: the conversation's own system turn, else the template's default).
        force_image: start the reply with an image (per sample or for all); the caller's way to ask for an
            image from a model that would not emit ``<|image_gen_start|>`` by itself.
        seeds: one seed per sample (default ``sampling.seed + i``).
        logits_processor: ``f(samples, reply_ids, logits_BV) -> logits_BV`` applied to the text logits of the
            active rows before masking and sampling (``samples``: their indices in the batch).
        image_codes: per sample None or K code tensors ((p_k^2,) or (1, p_k^2)): the codes of the sample's
            first image are forced to these (teacher forcing at inference, e.g. to score an image).
        return_image_logits: keep each image's guided code logits per scale (CPU memory: L x V floats).
        return_pil: also convert the images to PIL.
        stats: a :class:`GenerationStats` to fill with counters (and timings if ``stats.timing``).
        prompt_format: ``training`` (the chat template the model is trained on) or ``evaluation`` (lmms-eval's
            one-string prompt with BOS: :mod:`vargpt.inference.processor`).
        past_max_positions: run past the LLM's ``max_position_embeddings`` as transformers' ``generate`` (and so
            lmms-eval) does, rotary positions extrapolating: a longer prompt is run, not refused, and a reply is
            not ended at the limit. False: a longer prompt raises and a reply ends ("length") at the limit.
        fast_paths: the decoder's speed switches (:class:`FastPaths`; None: those ``sampling`` asks for).

    Returns:
        One :class:`GenerationOutput` per conversation, in order.
    """
    cfg = SamplingConfig.coerce(sampling)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer: build the model with one or pass tokenizer=...")
    convs = as_conversations(conversations, images)
    n = len(convs)
    forced = _per_sample(force_image, n, "force_image")
    if any(forced) and cfg.max_images < 1:
        raise ValueError("force_image needs an image budget: sampling.max_images is 0")
    seeds = [cfg.seed + i for i in range(n)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} conversations")
    if image_codes is not None and len(image_codes) != n:
        raise ValueError(f"got {len(image_codes)} image_codes entries for {n} conversations")
    stats = GenerationStats() if stats is None else stats
    with _eval_mode(model):
        prompts = [
            prepare_prompt(model, tokenizer, messages, imgs, system, i, prompt_format)
            for i, (messages, imgs) in enumerate(convs)
        ]
        decoder = _MixedModalDecoder(
            model,
            tokenizer,
            cfg,
            seeds=seeds,
            stats=stats,
            logits_processor=logits_processor,
            image_codes=image_codes,
            return_image_logits=return_image_logits,
            system=system,
            past_max_positions=past_max_positions,
            fast_paths=FastPaths.of(cfg) if fast_paths is None else fast_paths,
        )
        t0 = time.perf_counter()
        outputs = decoder.run(prompts, forced)
        stats.total_s += time.perf_counter() - t0
    if return_pil:
        for out in outputs:
            out.images = [tensor_to_pil(t) for t in out.image_tensors]
    return outputs


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call (no DropPath, no label dropout), then every sub-module's own mode back."""
    modes = [(m, m.training) for m in model.modules() if m.training]
    if not modes:  # already in eval mode (eval, bench): nothing to switch or restore
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _per_sample(value: bool | Sequence[bool], n: int, name: str) -> list[bool]:
    if isinstance(value, bool):
        return [value] * n
    values = [bool(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} conversations")
    return values


class _MixedModalDecoder:
    """The generation loop of one call (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        cfg: SamplingConfig,
        *,
        seeds: list[int],
        stats: GenerationStats,
        logits_processor: LogitsProcessor | None,
        image_codes: Sequence[Sequence[torch.Tensor] | None] | None,
        return_image_logits: bool,
        system: str | None,
        past_max_positions: bool,
        fast_paths: FastPaths,
    ) -> None:
        self.model, self.tokenizer, self.cfg, self.stats = model, tokenizer, cfg, stats
        self.ids = model.ids
        self.llm = model.language_model.model
        self.lm_head = model.language_model.lm_head
        self.embed = model.language_model.get_input_embeddings()
        self.var, self.vq = model.vargpt_gen, model.vae_local
        self.device = self.embed.weight.device
        self.schedule = self.var.schedule
        self.K, self.L = self.schedule.num_scales, self.schedule.num_tokens
        # The positions the decoder may use: the LLM's limit, or (past_max_positions) none, as transformers' generate.
        self.max_pos = sys.maxsize if past_max_positions else int(model.cfg.llm.max_position_embeddings)
        self.ratios = [cfg_ratio(cfg.cfg, k, self.K, cfg.cfg_schedule) for k in range(self.K)]
        self.guided = cfg.uncond != "none" and cfg.cfg > 0
        self.logits_processor = logits_processor
        self.return_image_logits = return_image_logits
        self.system = system
        self.fast = fast_paths
        self._mask_4d = fast_paths.llm_mask_4d and model.language_model.config._attn_implementation == "sdpa"
        self._cache_kw = "cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values"
        self._null_state: LLMState | None = None
        self.replies = []
        for i, seed in enumerate(seeds):
            g = torch.Generator(device=self.device).manual_seed(seed)
            forced = None if image_codes is None or image_codes[i] is None else list(image_codes[i])
            if forced is not None and len(forced) != self.K:
                raise ValueError(f"image_codes[{i}] has {len(forced)} scales, the model has {self.K}")
            self.replies.append(ReplyProgress(seed=seed, generator=g, forced_codes=forced))
        # Never valid output: image-slot tokens, padding, and the embedding's padded rows past the tokenizer.
        never = {self.ids.image, self.ids.gen_pad, self.ids.gen_end, self.ids.pad} - {self.ids.eos}
        self.never_V = torch.zeros(self.lm_head.out_features, dtype=torch.bool, device=self.device)
        self.never_V[sorted(never)] = True
        self.never_V[len(tokenizer) :] = True

    # ------------------------------------------------------------------ LLM calls
    def _llm(self, embeds_BqH: torch.Tensor, state: LLMState) -> tuple[torch.Tensor, LLMState]:
        """One forward continuing ``state``'s cache; returns the last hidden states (B, q, H) and the new state."""
        B, q = embeds_BqH.shape[:2]
        mask = torch.cat((state.mask, state.mask.new_ones(B, q)), dim=1)
        pos_Bq = state.pos[:, None] + torch.arange(q, device=self.device)
        out = self.llm(
            inputs_embeds=embeds_BqH,
            attention_mask=attention_mask_4d(mask, q) if self._mask_4d else mask,
            position_ids=pos_Bq,
            use_cache=True,
            **{self._cache_kw: state.cache},
        )
        cache = getattr(out, self._cache_kw, None)
        cache = state.cache if cache is None else cache
        return out.last_hidden_state, LLMState(cache, mask, state.pos + q)

    def _prefill(self, prompts: list[Prompt]) -> tuple[torch.Tensor, LLMState]:
        """Left-padded prompts through the LLM: last-position logits (B, V) and the state."""
        B, T = len(prompts), max(len(p.ids) for p in prompts)
        if self.max_pos <= T:
            raise ValueError(
                f"a prompt has {T} tokens; the LLM holds {self.max_pos} positions (past_max_positions=True runs it "
                "anyway, as transformers' generate does)"
            )
        ids_BT = torch.full((B, T), self.ids.pad, dtype=torch.long)
        mask_BT = torch.zeros((B, T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_BT[i, T - len(p.ids) :] = torch.tensor(p.ids)
            mask_BT[i, T - len(p.ids) :] = 1
        ids_BT, mask_BT = ids_BT.to(self.device), mask_BT.to(self.device)
        und = [x for p in prompts for x in p.und_pixels]
        gen = [x for p in prompts for x in p.gen_pixels]
        feats = self.model.image_features(torch.stack(und).to(self.device)) if und else None
        gen_embeds = None
        if gen:
            codes = self.vq.img_to_codes(torch.stack(gen).to(self.device))
            x_BLC, _ = self.model.gen_inputs(codes)
            gen_embeds = self.model.image_gen_projector(x_BLC)
        embeds = self.model.build_inputs_embeds(ids_BT, feats, gen_embeds)
        pos_BT = (mask_BT.cumsum(1) - 1).clamp(min=0)
        out = self.llm(
            inputs_embeds=embeds, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True,
            **{self._cache_kw: new_cache()},
        )  # fmt: skip
        cache = getattr(out, self._cache_kw)
        self.stats.llm_prefill_calls += 1
        state = LLMState(cache, mask_BT, mask_BT.sum(1))
        return self.lm_head(out.last_hidden_state[:, -1]).float(), state

    def _null_prompt_state(self, n: int) -> LLMState:
        """The empty instruction's prefilled cache (computed once per call, see :func:`null_prompt_ids`),
        repeated for ``n`` rows."""
        if self._null_state is None:
            ids = null_prompt_ids(self.tokenizer, self.ids, self.L, self.system)
            ids_1T = torch.tensor([ids], device=self.device)
            state = LLMState(new_cache(), ids_1T.new_zeros(1, 0), ids_1T.new_zeros(1))
            _, self._null_state = self._llm(self.embed(ids_1T), state)
            self.stats.llm_prefill_calls += 1
        s = self._null_state
        kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in cache_kv(s.cache)]
        return LLMState(
            make_cache([(k.contiguous(), v.contiguous()) for k, v in kv]), s.mask.expand(n, -1), s.pos.expand(n)
        )

    # ------------------------------------------------------------------ text
    def _pick_tokens(self, logits_BV: torch.Tensor, rows: list[int], state_pos: torch.Tensor) -> list[int]:
        """Next text token of each active row (greedy or sampled with the row's own generator)."""
        cfg = self.cfg
        if self.logits_processor is not None:
            logits_BV = self.logits_processor(rows, [self.replies[r].token_ids for r in rows], logits_BV).float()
        logits_BV = logits_BV.masked_fill(self.never_V, float("-inf"))
        # An image may start while the reply has image budget and the LLM has room for start + L slots + end.
        budget_B = torch.tensor([len(self.replies[r].images) < cfg.max_images for r in rows], device=self.device)
        can_start_B = budget_B & (state_pos + self.L + 2 <= self.max_pos)
        start_B = logits_BV[:, self.ids.gen_start]
        logits_BV[:, self.ids.gen_start] = torch.where(can_start_B, start_B, torch.full_like(start_B, float("-inf")))
        if cfg.greedy:
            return logits_BV.argmax(-1).tolist()
        logits_B1V = filter_top_k_top_p((logits_BV / cfg.temperature)[:, None], cfg.text_top_k, cfg.text_top_p)
        u_B1 = torch.stack([torch.rand(1, generator=self.replies[r].generator, device=self.device) for r in rows])
        return inverse_cdf(logits_B1V.softmax(-1), u_B1)[:, 0].tolist()

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _commit(self, r: int, token: int) -> bool:
        """Add a sampled token to reply ``r``; True when it starts an image."""
        reply = self.replies[r]
        reply.steps += 1
        self.stats.text_tokens += 1
        reply.token_ids.append(token)
        if token == self.ids.eos:
            reply.finish = "eos"
            return False
        if token == self.ids.gen_start:
            reply.segments.append(self._decode_text(reply.segment_ids))
            reply.segment_ids = []
            return True
        reply.segment_ids.append(token)
        if self.cfg.stop:
            text = self._decode_text(reply.segment_ids)
            hits = [i for i in (text.find(s) for s in self.cfg.stop) if i >= 0]
            if hits:
                reply.stop_text = text[: min(hits)]
                reply.finish = "stop"
        return False

    # ------------------------------------------------------------------ images
    def _image_group(self, state: LLMState, group: list[int], rows: list[int]) -> LLMState:
        """Generate one image for each of the active rows ``group``; the other rows wait (masked holes)."""
        n, N = len(group), len(rows)
        idx = torch.tensor(group, device=self.device)
        sub = state if n == N else state.rows(idx)
        if self.guided and self.cfg.uncond == "null_prompt":
            sub = cat_states(sub, self._null_prompt_state(n))  # rows n..2n-1: the empty instruction
        samples = [rows[j] for j in group]
        sub = self._draw_images(sub, samples)
        if sub.mask.shape[0] > n:
            sub = sub.rows(torch.arange(n, device=self.device))
        if n == N:
            return sub
        # Put the group's grown rows back; the waiting rows get masked holes of the same length.
        grow = sub.mask.shape[1] - state.mask.shape[1]
        mask = torch.cat((state.mask, state.mask.new_zeros(N, grow)), dim=1)
        mask[idx] = sub.mask
        pos = state.pos.clone()
        pos[idx] = sub.pos
        return LLMState(cache_merge_rows(state.cache, sub.cache, idx), mask, pos)

    def _conditions(self, n: int, n_llm: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Class rows of the start token fed to the LLM (n_llm rows) and of the VAR's AdaLN (its batch).

        The release uses the null row everywhere (reference 2.3); otherwise the conditional rows use the
        "generate" row and the unconditional ones the null row, as in training with label dropout.
        """
        null, gen = self.var.null_class, self.model.gen_label
        if self.cfg.uncond == "release":
            llm_labels, var_labels = [null] * n, [null] * (2 * n if self.guided else n)
        else:
            llm_labels = [gen] * n + [null] * (n_llm - n)
            var_labels = llm_labels
        llm_cond_RD = self.var.cond(torch.tensor(llm_labels, device=self.device))
        return llm_cond_RD, self.var.cond(torch.tensor(var_labels, device=self.device))

    def _draw_images(self, sub: LLMState, samples: list[int]) -> LLMState:
        """The K scales for the rows of ``sub`` (conditional rows first, then any null-prompt rows): one LLM
        forward and one VAR forward per scale; stores each sample's image, codes and logits; returns the state."""
        var, stats, n, n_llm = self.var, self.stats, len(samples), sub.mask.shape[0]
        release_noise = self.cfg.uncond == "release" and self.guided
        llm_cond_RD, var_cond_RD = self._conditions(n, n_llm)
        gen_in, gen_out = self.model.image_gen_projector, self.model.image_gen_projector_out
        proj_dtype = next(gen_in.parameters()).dtype
        start_R1H = self.embed(torch.full((n_llm, 1), self.ids.gen_start, device=self.device))
        first_R1H = gen_in(var.embed_first_scale(llm_cond_RD).to(proj_dtype)).to(start_R1H.dtype)
        chunk_RlH = torch.cat((start_R1H, first_R1H), dim=1)  # the start token rides with scale 0

        generators = [self.replies[r].generator for r in samples]
        ratios = self.ratios if self.guided else None
        sampler = ScaleSampler(
            var, self.vq, ratios, self.cfg.top_k, self.cfg.top_p, generators, options=self.fast.scale_step
        )
        codes_k: list[torch.Tensor] = []
        logits_k: list[torch.Tensor] = []
        for k, l in enumerate(self.schedule.tokens_per_scale):
            with stats.timer("llm_image_s", self.device):
                h_RlH, sub = self._llm(chunk_RlH, sub)
                h_RlH = h_RlH[:, -l:]
                stats.llm_image_calls += 1
            with stats.timer("var_s", self.device):
                if release_noise:  # the release's "unconditional" branch: N(0, I) in place of the LLM output
                    noise = [
                        torch.randn((1, l, h_RlH.shape[-1]), generator=self.replies[r].generator,
                                    device=self.device, dtype=h_RlH.dtype)
                        for r in samples
                    ]  # fmt: skip
                    h_RlH = torch.cat([h_RlH, *noise])
                out = sampler.step(k, gen_out(h_RlH), var_cond_RD, self._forced_codes(samples, k))
                stats.var_calls += 1
                codes_k.append(out.codes)
                if self.return_image_logits:
                    logits_k.append(out.logits.cpu())
                if out.next_x is not None:
                    chunk_RlH = gen_in(out.next_x.to(proj_dtype)).to(start_R1H.dtype)
                    if n_llm > n:  # the null-prompt rows get the same (shared) codes' embeddings
                        chunk_RlH = chunk_RlH.repeat(n_llm // n, 1, 1)
        f_hat = sampler.f_hat
        with stats.timer("decode_s", self.device):
            dtype = self.vq.post_quant_conv.weight.dtype
            img_B3HW = self.vq.fhat_to_img(f_hat.to(dtype), self.fast.vq_decode)
            imgs = ((img_B3HW.float() + 1) / 2).clamp(0, 1).cpu()
        codes_cpu = [c.cpu() for c in codes_k]
        for i, r in enumerate(samples):
            reply = self.replies[r]
            reply.images.append(imgs[i])
            reply.codes.append([c[i] for c in codes_cpu])
            if self.return_image_logits:
                reply.logits.append([lg[i] for lg in logits_k])
            reply.token_ids += [self.ids.gen_pad] * self.L + [self.ids.gen_end]
        stats.images += n
        return sub

    def _forced_codes(self, samples: list[int], k: int) -> list[torch.Tensor | None]:
        """Scale ``k``'s forced codes of each sample (``image_codes``, first image only), None where it draws."""
        forced = []
        for r in samples:
            reply = self.replies[r]
            forced.append(reply.forced_codes[k] if reply.forced_codes is not None and not reply.images else None)
        return forced

    # ------------------------------------------------------------------ the loop
    def run(self, prompts: list[Prompt], forced: list[bool]) -> list[GenerationOutput]:
        stats, cfg = self.stats, self.cfg
        rows = list(range(len(prompts)))
        with stats.timer("prefill_s", self.device):
            logits, state = self._prefill(prompts)
            tokens = self._pick_tokens(logits, rows, state.pos)
        tokens = [self.ids.gen_start if forced[r] else t for r, t in zip(rows, tokens, strict=True)]
        while True:
            group = [j for j, (r, t) in enumerate(zip(rows, tokens, strict=True)) if self._commit(r, t)]
            pending = list(tokens)
            if group:
                state = self._image_group(state, group, rows)
                for j in group:
                    pending[j] = self.ids.gen_end
            for r, pos in zip(rows, state.pos.tolist(), strict=True):
                reply = self.replies[r]
                if reply.finish is None and (reply.steps >= cfg.max_new_tokens or pos + 1 >= self.max_pos):
                    reply.finish = "length"
            keep = [j for j, r in enumerate(rows) if self.replies[r].finish is None]
            if not keep:
                break
            if len(keep) < len(rows):
                state = state.rows(torch.tensor(keep, device=self.device)).compact()
                rows, pending = [rows[j] for j in keep], [pending[j] for j in keep]
            with stats.timer("text_s", self.device):
                ids_n1 = torch.tensor(pending, device=self.device)[:, None]
                h, state = self._llm(self.embed(ids_n1), state)
                stats.llm_text_calls += 1
                tokens = self._pick_tokens(self.lm_head(h[:, -1]).float(), rows, state.pos)
        return [self._finish(reply, prompt.ids) for reply, prompt in zip(self.replies, prompts, strict=True)]

    def _finish(self, reply: ReplyProgress, prompt_ids: list[int]) -> GenerationOutput:
        last = reply.stop_text if reply.stop_text is not None else self._decode_text(reply.segment_ids)
        segments = [*reply.segments, last]
        return GenerationOutput(
            text=IMAGE_GEN_PLACEHOLDER.join(segments),
            segments=segments,
            images=[],
            image_tensors=reply.images,
            image_codes=reply.codes,
            token_ids=reply.token_ids,
            finish_reason=reply.finish or "length",
            seed=reply.seed,
            image_logits=reply.logits if self.return_image_logits else None,
            prompt_ids=list(prompt_ids),
        )
