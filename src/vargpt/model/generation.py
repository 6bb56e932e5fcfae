"""Batched, KV-cached mixed-modal generation: a reply may hold text, images and more text.

``generate(model, conversations, images, sampling)`` (also ``VARGPT.generate``) takes a batch of
conversations, builds each prompt, left-pads them and decodes the assistant replies together
(VARGPT-REFERENCE.md 2.3, 9.3, 9.6, 9.7). A prompt has one of two formats, as in the release (reference 3):

* ``prompt_format="training"`` (default): the training template of ``vargpt.data.chat`` (elements encoded one
  by one, no BOS), which is what the model was fine-tuned on;
* ``prompt_format="evaluation"``: lmms-eval's VARGPT wrapper and the release's processor: ONE string, the
  tokenizer's own chat template when it has one, else the Vicuna v1 template
  ``{system} USER: {turn} ASSISTANT:``, every ``<image>`` expanded in the string to the image-token run, encoded
  in one tokenizer call with the tokenizer's special tokens (BOS). One user turn, understanding images only.

Decoding:

* text: one LLM forward per step over the active rows, continuing the LLM's KV cache (HF ``DynamicCache``);
  greedy or temperature sampling; an ``<|image_gen_start|>`` sampled by the model (or forced by the caller)
  starts an image;
* image: K chunked LLM forwards (one per scale; the first also carries the start token) continue the same
  cache; the hidden states go through ``image_gen_projector_out`` into the VAR decoder, which keeps its own KV
  cache at batch 2n for classifier-free guidance; codes are sampled per scale (top-k / top-p, ramped CFG), the
  VQ-VAE's ``next_input`` gives the next scale's input, and the VQ-VAE decodes the image. Then
  ``<|image_gen_end|>`` is fed and text decoding continues, which the release never does;
* rows that sampled ``<|image_gen_start|>`` in the same step make one image group; the other rows wait
  (their cache rows get masked holes, no compute); finished rows (eos, stop string, ``max_new_tokens``) are
  dropped from the caches, and columns masked for every remaining row are cut;
* every sample has its own ``torch.Generator`` (seed + i), used only for its own draws, so a batched call
  gives the same result as one call per sample.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.model.sampling import cfg_ratio, filter_top_k_top_p
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, IMAGE_TOKEN
from vargpt.model.var_blocks import VARKVCache

LogitsProcessor = Callable[[list[int], list[list[int]], torch.Tensor], torch.Tensor]
PROMPT_FORMATS = ("training", "evaluation")


# --------------------------------------------------------------------------------------------- results
@dataclass
class GenerationOutput:
    """One reply: its text (``<image_gen>`` where each image sits) and its images, in order."""

    text: str
    segments: list[str]  # the text around the images: len(images) + 1 pieces
    images: list[Any]  # PIL images (empty when return_pil=False)
    image_tensors: list[torch.Tensor]  # (3, R, R) float in [0, 1], on the CPU
    image_codes: list[list[torch.Tensor]]  # per image: K LongTensors (p_k^2,), on the CPU
    token_ids: list[int]  # the reply in the training layout: text, start, L x pad, end, text ..., eos
    finish_reason: str  # eos | stop | length
    seed: int
    prompt_ids: list[int] = field(default_factory=list)  # the prompt as fed (image blocks expanded)
    image_logits: list[list[torch.Tensor]] | None = None  # per image, per scale (p_k^2, V) guided logits


@dataclass
class GenerationStats:
    """Counters and timings of a generate call (pass one in to have it filled; ``bench/generate.py`` does).

    With ``timing=True`` the device is synchronised around every timed part, so the split is exact but the
    call is a little slower; without it only the counters are kept.
    """

    timing: bool = False
    llm_prefill_calls: int = 0
    llm_text_calls: int = 0
    llm_image_calls: int = 0
    var_calls: int = 0
    text_tokens: int = 0
    images: int = 0
    prefill_s: float = 0.0
    text_s: float = 0.0  # text steps: LLM forward, lm_head, sampling
    llm_image_s: float = 0.0  # the LLM's chunked forwards of the image scales
    var_s: float = 0.0  # VAR decoder, code sampling and the VQ-VAE's next_input
    decode_s: float = 0.0  # VQ-VAE decoder (f_hat -> pixels)
    total_s: float = 0.0

    @contextlib.contextmanager
    def timer(self, part: str, device: torch.device) -> Iterator[None]:
        if not self.timing:
            yield
            return
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            setattr(self, part, getattr(self, part) + time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- entry point
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
            one-string prompt with BOS, see the module docstring and :func:`evaluation_prompt_ids`).
        past_max_positions: run past the LLM's ``max_position_embeddings`` as transformers' ``generate`` (and so
            lmms-eval) does, rotary positions extrapolating: a longer prompt is run, not refused, and a reply is
            not ended at the limit. False: a longer prompt raises and a reply ends ("length") at the limit.

    Returns:
        One :class:`GenerationOutput` per conversation, in order.
    """
    cfg = SamplingConfig.coerce(sampling)
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer: build the model with one or pass tokenizer=...")
    convs = _as_conversations(conversations, images)
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
            _prepare_prompt(model, tokenizer, messages, imgs, system, i, prompt_format)
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
        )
        t0 = time.perf_counter()
        outputs = decoder.run(prompts, forced)
        stats.total_s += time.perf_counter() - t0
    if return_pil:
        for out in outputs:
            out.images = [tensor_to_pil(t) for t in out.image_tensors]
    return outputs


def tensor_to_pil(img_3HW: torch.Tensor) -> Any:
    """(3, H, W) float in [0, 1] -> PIL RGB image."""
    from PIL import Image

    arr = (img_3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call (no DropPath, no label dropout), then every sub-module's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
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


# --------------------------------------------------------------------------------------------- inputs
def _is_single_conversation(conversations: Any) -> bool:
    if isinstance(conversations, (str, dict)):
        return True
    return (
        isinstance(conversations, (list, tuple))
        and len(conversations) > 0
        and isinstance(conversations[0], dict)
        and ("role" in conversations[0] or "from" in conversations[0])
    )


def _as_conversations(conversations: Any, images: Sequence[Any] | None) -> list[tuple[list[dict[str, str]], list]]:
    """Normalise the accepted input forms to [(messages, images)], one per sample, with clear errors."""
    from vargpt.data.records import normalize_messages

    if _is_single_conversation(conversations):
        conversations = [conversations]
        images = None if images is None else [images]
    if not isinstance(conversations, (list, tuple)) or len(conversations) == 0:
        raise ValueError("generate: no conversations given (pass a prompt string or a list of conversations)")
    if images is not None and len(images) != len(conversations):
        raise ValueError(f"generate: {len(images)} image lists for {len(conversations)} conversations")
    out = []
    for i, conv in enumerate(conversations):
        imgs = None if images is None else images[i]
        if isinstance(conv, str):
            if not conv.strip():
                raise ValueError(f"conversation {i} is empty (an empty prompt string)")
            raw: Any = [{"role": "user", "content": conv}]
        elif isinstance(conv, dict):
            if "messages" not in conv:
                raise ValueError(f"conversation {i}: a record needs a 'messages' list (got keys {sorted(conv)})")
            raw = conv["messages"]
            imgs = conv.get("images") if imgs is None else imgs
        else:
            raw = conv
        try:
            messages = normalize_messages(list(raw) if isinstance(raw, tuple) else raw)
        except ValueError as exc:  # the data package's InvalidSample errors are ValueErrors
            raise ValueError(f"conversation {i} is invalid: {exc}") from None
        if imgs is None:
            imgs = []
        elif not isinstance(imgs, (list, tuple)):
            imgs = [imgs]
        out.append((messages, list(imgs)))
    return out


@dataclass
class _Prompt:
    ids: list[int]
    und_pixels: list[torch.Tensor]  # (3, S, S), CLIP-normalised
    gen_pixels: list[torch.Tensor]  # (3, R, R) in [-1, 1]


def evaluation_prompt(messages: list[dict[str, str]], tokenizer: Any, system: str | None = None) -> str:
    """lmms-eval's prompt string of one question (its VARGPT wrapper), placeholders not yet expanded.

    The tokenizer's own chat template when it has one (applied to the user turn with the generation prompt, as
    the wrapper does; ``system`` is then unused), else the wrapper's Vicuna v1 template
    ``{system} USER: {turn} ASSISTANT:``.

    Args:
        messages: one user turn, optionally after a system turn (lmms-eval asks one question per prompt).
        tokenizer: an HF tokenizer.
        system: the Vicuna template's system text; None: the conversation's system turn, else the release's
            :data:`vargpt.data.chat.SYSTEM_PROMPT` (lmms-eval's template hard-codes the same text).
    """
    from vargpt.data.chat import SYSTEM_PROMPT

    turns = messages
    if turns and turns[0]["role"] == "system":
        system = turns[0]["content"] if system is None else system
        turns = turns[1:]
    if [turn["role"] for turn in turns] != ["user"]:
        roles = [turn["role"] for turn in messages]
        raise ValueError(f"the evaluation prompt format takes one user turn (one question), got the roles {roles}")
    content = turns[0]["content"]
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    system = SYSTEM_PROMPT if system is None else system
    return f"{system} USER: {content} ASSISTANT:" if system else f"USER: {content} ASSISTANT:"


def evaluation_prompt_ids(
    messages: list[dict[str, str]], tokenizer: Any, num_image_tokens: int, system: str | None = None
) -> list[int]:
    """The ids of :func:`evaluation_prompt` as the release's processor makes them: every ``<image>`` replaced in
    the string by ``num_image_tokens`` image tokens, then ONE tokenizer call with special tokens (BOS)."""
    expanded = evaluation_prompt(messages, tokenizer, system).replace(IMAGE_PLACEHOLDER, IMAGE_TOKEN * num_image_tokens)
    return tokenizer(expanded, add_special_tokens=True)["input_ids"]


def _prompt_ids(
    model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], kinds: list[str], system: str | None,
    prompt_format: str, where: str,
) -> list[int]:  # fmt: skip
    """The prompt ids in ``prompt_format`` (see :func:`generate`); an evaluation prompt is checked to hold exactly
    one image block per ``<image>`` (its one user turn cannot hold an ``<image_gen>``)."""
    from vargpt.data.chat import tokenize_conversation

    if prompt_format == "training":
        return tokenize_conversation(
            messages, tokenizer, model.ids, model.num_image_tokens, model.num_gen_tokens,
            add_generation_prompt=True, system=system,
        ).input_ids  # fmt: skip
    try:
        ids = evaluation_prompt_ids(messages, tokenizer, model.num_image_tokens, system)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    special = model.ids
    found, wanted = ids.count(special.image), len(kinds) * model.num_image_tokens
    found_gen = sum(token in (special.gen_start, special.gen_pad, special.gen_end) for token in ids)
    # A tokenizer that splits '<image>', or an image special token in the question text, would misplace features.
    if found != wanted or found_gen:
        raise ValueError(
            f"{where}: the evaluation prompt holds {found} image tokens ({wanted} expected for {len(kinds)} "
            f"'<image>') and {found_gen} image-generation tokens (0 expected): the tokenizer must keep "
            f"{IMAGE_TOKEN!r} as one special token, and the text must not contain image special tokens"
        )
    return ids


def _prepare_prompt(
    model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], imgs: list, system: str | None, i: int,
    prompt_format: str,
) -> _Prompt:  # fmt: skip
    """Tokenise one conversation with the generation prompt and preprocess its images (checked)."""
    from vargpt.data.records import IMAGE, placeholder_kinds

    try:
        kinds = placeholder_kinds(messages, open_end=True)
    except ValueError as exc:  # the data package's InvalidSample errors are ValueErrors
        raise ValueError(f"conversation {i} is invalid: {exc} (the last turn must be the user's)") from None
    if len(imgs) != len(kinds):
        n_und, n_gen = kinds.count(IMAGE), len(kinds) - kinds.count(IMAGE)
        hint = (
            "add one '<image>' to the user's text per input image"
            if len(imgs) > len(kinds)
            else "pass one image per placeholder"
        )
        raise ValueError(
            f"conversation {i} has {len(kinds)} image placeholder(s) ({n_und} '<image>', {n_gen} '<image_gen>') "
            f"but {len(imgs)} image(s) were given: {hint}"
        )
    ids = _prompt_ids(model, tokenizer, messages, kinds, system, prompt_format, f"conversation {i}")
    und, gen = [], []
    for j, (kind, img) in enumerate(zip(kinds, imgs, strict=True)):
        if kind == IMAGE:
            und.append(_understanding_pixels(model, img, f"conversation {i}, image {j}"))
        else:
            gen.append(_generated_pixels(model, img, f"conversation {i}, image {j}"))
    return _Prompt(ids=ids, und_pixels=und, gen_pixels=gen)


def _load_pil(img: Any, where: str) -> Any:
    """A path is decoded to RGB like the data pipeline; a PIL image must already be RGB (no silent alpha drop)."""
    from PIL import Image

    if isinstance(img, (str, Path)):
        from vargpt.data.transforms import read_image_file

        return read_image_file(img, f"{where}: {img}")
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"{where}: image mode is {img.mode!r}, expected 'RGB' (convert it: img.convert('RGB'))")
        if min(img.size) < 1:
            raise ValueError(f"{where}: empty image of size {img.size}")
        return img
    raise TypeError(f"{where}: expected a PIL image, a file path or a tensor, got {type(img).__name__}")


def _understanding_pixels(model: nn.Module, img: Any, where: str) -> torch.Tensor:
    v = model.cfg.vision
    S = v.image_size
    if isinstance(img, torch.Tensor):
        if img.dim() == 4 and img.shape[0] == 1:
            img = img[0]
        if tuple(img.shape) != (3, S, S) or not img.is_floating_point():
            raise ValueError(
                f"{where}: an input image tensor must be float (3, {S}, {S}), CLIP-normalised (got "
                f"{tuple(img.shape)} {img.dtype}); pass a PIL image to have it resized and normalised"
            )
        return img.float()
    from vargpt.data.transforms import clip_transform

    return clip_transform(S, tuple(v.image_mean), tuple(v.image_std))(_load_pil(img, where))


def _generated_pixels(model: nn.Module, img: Any, where: str) -> torch.Tensor:
    R = model.cfg.vqvae.image_size
    if isinstance(img, torch.Tensor):
        if img.dim() == 4 and img.shape[0] == 1:
            img = img[0]
        if tuple(img.shape) != (3, R, R) or not img.is_floating_point():
            raise ValueError(
                f"{where}: an '<image_gen>' image tensor must be float (3, {R}, {R}) in [-1, 1] (got "
                f"{tuple(img.shape)} {img.dtype})"
            )
        return img.float()
    from vargpt.data.transforms import var_transform

    return var_transform(R, train=False)(_load_pil(img, where))


# --------------------------------------------------------------------------------------------- LLM KV cache
# The cache is an HF DynamicCache whose rows (samples) and columns (positions) this module reshapes: it picks
# rows for an image group, pads the waiting rows with masked holes, and cuts columns nobody attends to.
# transformers >= 4.54 keeps per-layer ``layers[i].keys/.values``; 4.4x kept ``key_cache``/``value_cache`` lists.
def _cache_kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers 4.x
        return DynamicCache.from_legacy_cache(tuple(kv))
    return DynamicCache(kv)


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _cache_index(cache: Any, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> Any:
    """A new cache holding the given rows and/or columns (positions) of every layer."""
    kv = []
    for k, v in _cache_kv(cache):
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        if cols is not None:
            k, v = k.index_select(2, cols), v.index_select(2, cols)
        kv.append((k, v))
    return _make_cache(kv)


def _cache_pad_left(cache: Any, n: int) -> Any:
    if n == 0:
        return cache
    return _make_cache([(_pad_dim2(k, n, 0), _pad_dim2(v, n, 0)) for k, v in _cache_kv(cache)])


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
    return _make_cache(
        [
            (torch.cat((ka, kb)), torch.cat((va, vb)))
            for (ka, va), (kb, vb) in zip(_cache_kv(a), _cache_kv(b), strict=True)
        ]
    )


def _cache_merge_rows(full: Any, sub: Any, rows: torch.Tensor) -> Any:
    """``full`` (N rows, T columns) grown to ``sub``'s length: its ``rows`` replaced by ``sub``, the rest padded."""
    kv = []
    for (kf, vf), (ks, vs) in zip(_cache_kv(full), _cache_kv(sub), strict=True):
        grow = ks.shape[2] - kf.shape[2]
        kf, vf = _pad_dim2(kf, 0, grow), _pad_dim2(vf, 0, grow)
        kf[rows], vf[rows] = ks, vs
        kv.append((kf, vf))
    return _make_cache(kv)


@dataclass
class _LLMState:
    """LLM cache of a set of rows: the 2D attention mask over its columns and each row's next position."""

    cache: Any
    mask: torch.Tensor  # (n, T) long: 1 = a real token, 0 = padding or a hole
    pos: torch.Tensor  # (n,) long: the next token's position id (real tokens so far)

    def rows(self, idx: torch.Tensor) -> _LLMState:
        return _LLMState(_cache_index(self.cache, rows=idx), self.mask[idx], self.pos[idx])

    def compact(self) -> _LLMState:
        """Cut the columns every row masks (left padding of dropped rows, holes of waiting rows)."""
        keep = self.mask.any(dim=0)
        if bool(keep.all()):
            return self
        cols = keep.nonzero().view(-1)
        return _LLMState(_cache_index(self.cache, cols=cols), self.mask[:, cols], self.pos)


def _cat_states(a: _LLMState, b: _LLMState) -> _LLMState:
    """Stack two row sets; the shorter is left-padded with masked columns (positions are per row)."""
    Ta, Tb = a.mask.shape[1], b.mask.shape[1]
    T = max(Ta, Tb)
    ca, cb = _cache_pad_left(a.cache, T - Ta), _cache_pad_left(b.cache, T - Tb)
    ma = torch.cat((a.mask.new_zeros(a.mask.shape[0], T - Ta), a.mask), dim=1)
    mb = torch.cat((b.mask.new_zeros(b.mask.shape[0], T - Tb), b.mask), dim=1)
    return _LLMState(_cache_cat_rows(ca, cb), torch.cat((ma, mb)), torch.cat((a.pos, b.pos)))


# --------------------------------------------------------------------------------------------- the decoder
@dataclass
class _Reply:
    """Per-sample progress."""

    seed: int
    generator: torch.Generator
    forced_codes: list[torch.Tensor] | None = None
    token_ids: list[int] = field(default_factory=list)
    segment_ids: list[int] = field(default_factory=list)  # text ids since the last image
    segments: list[str] = field(default_factory=list)
    stop_text: str | None = None  # the current segment cut at a stop string
    images: list[torch.Tensor] = field(default_factory=list)
    codes: list[list[torch.Tensor]] = field(default_factory=list)
    logits: list[list[torch.Tensor]] = field(default_factory=list)
    steps: int = 0
    finish: str | None = None


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
        self._cache_kw = "cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values"
        self._null_state: _LLMState | None = None
        self.replies = []
        for i, seed in enumerate(seeds):
            g = torch.Generator(device=self.device).manual_seed(seed)
            forced = None if image_codes is None or image_codes[i] is None else list(image_codes[i])
            if forced is not None and len(forced) != self.K:
                raise ValueError(f"image_codes[{i}] has {len(forced)} scales, the model has {self.K}")
            self.replies.append(_Reply(seed=seed, generator=g, forced_codes=forced))
        # Never valid output: image-slot tokens, padding, and the embedding's padded rows past the tokenizer.
        never = {self.ids.image, self.ids.gen_pad, self.ids.gen_end, self.ids.pad} - {self.ids.eos}
        self.never_V = torch.zeros(self.lm_head.out_features, dtype=torch.bool, device=self.device)
        self.never_V[sorted(never)] = True
        self.never_V[len(tokenizer) :] = True

    # ------------------------------------------------------------------ LLM calls
    def _llm(self, embeds_BqH: torch.Tensor, state: _LLMState) -> tuple[torch.Tensor, _LLMState]:
        """One forward continuing ``state``'s cache; returns the last hidden states (B, q, H) and the new state."""
        B, q = embeds_BqH.shape[:2]
        mask = torch.cat((state.mask, state.mask.new_ones(B, q)), dim=1)
        pos_Bq = state.pos[:, None] + torch.arange(q, device=self.device)
        out = self.llm(
            inputs_embeds=embeds_BqH,
            attention_mask=mask,
            position_ids=pos_Bq,
            use_cache=True,
            **{self._cache_kw: state.cache},
        )
        cache = getattr(out, self._cache_kw, None)
        cache = state.cache if cache is None else cache
        return out.last_hidden_state, _LLMState(cache, mask, state.pos + q)

    def _prefill(self, prompts: list[_Prompt]) -> tuple[torch.Tensor, _LLMState]:
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
            **{self._cache_kw: _new_cache()},
        )  # fmt: skip
        cache = getattr(out, self._cache_kw)
        self.stats.llm_prefill_calls += 1
        state = _LLMState(cache, mask_BT, mask_BT.sum(1))
        return self.lm_head(out.last_hidden_state[:, -1]).float(), state

    def _null_prompt_state(self, n: int) -> _LLMState:
        """The empty instruction's prefilled cache (computed once per call), repeated for ``n`` rows.

        The chat template refuses an empty user turn, so the prompt is built from the one template with an
        ``<image>`` as the whole instruction and that image block cut out: the template's text with nothing
        between ``USER:`` and ``ASSISTANT:``.
        """
        if self._null_state is None:
            from vargpt.data.chat import tokenize_conversation

            tok = tokenize_conversation(
                [{"role": "user", "content": "<image>"}],
                self.tokenizer,
                self.ids,
                1,
                self.L,
                add_generation_prompt=True,
                system=self.system,
            )
            ids = [t for t in tok.input_ids if t != self.ids.image]
            ids_1T = torch.tensor([ids], device=self.device)
            state = _LLMState(_new_cache(), ids_1T.new_zeros(1, 0), ids_1T.new_zeros(1))
            _, self._null_state = self._llm(self.embed(ids_1T), state)
            self.stats.llm_prefill_calls += 1
        s = self._null_state
        kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in _cache_kv(s.cache)]
        return _LLMState(
            _make_cache([(k.contiguous(), v.contiguous()) for k, v in kv]), s.mask.expand(n, -1), s.pos.expand(n)
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
        return _inverse_cdf(logits_B1V.softmax(-1), u_B1)[:, 0].tolist()

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
    def _image_group(self, state: _LLMState, group: list[int], rows: list[int]) -> _LLMState:
        """Generate one image for each of the active rows ``group``; the other rows wait (masked holes)."""
        n, N = len(group), len(rows)
        idx = torch.tensor(group, device=self.device)
        sub = state if n == N else state.rows(idx)
        if self.guided and self.cfg.uncond == "null_prompt":
            sub = _cat_states(sub, self._null_prompt_state(n))  # rows n..2n-1: the empty instruction
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
        return _LLMState(_cache_merge_rows(state.cache, sub.cache, idx), mask, pos)

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

    def _draw_images(self, sub: _LLMState, samples: list[int]) -> _LLMState:
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

        var_cache, f_hat = VARKVCache(), None
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
                logits_BlV = var.decode(gen_out(h_RlH), var_cond_RD, attn_bias=None, cache=var_cache)
                stats.var_calls += 1
                if self.guided:
                    t = self.ratios[k]
                    logits_BlV = (1 + t) * logits_BlV[:n] - t * logits_BlV[n:]
                codes_nl = self._pick_codes(logits_BlV, samples, k)
                codes_k.append(codes_nl)
                if self.return_image_logits:
                    logits_k.append(logits_BlV.cpu())
                f_hat, next_nlC = self.vq.next_input(k, f_hat, codes_nl)
                if next_nlC is not None:
                    x_nlC = var.embed_scale(k + 1, next_nlC)
                    chunk_RlH = gen_in(x_nlC.to(proj_dtype)).to(start_R1H.dtype)
                    if n_llm > n:  # the null-prompt rows get the same (shared) codes' embeddings
                        chunk_RlH = chunk_RlH.repeat(n_llm // n, 1, 1)
        with stats.timer("decode_s", self.device):
            dtype = self.vq.post_quant_conv.weight.dtype
            imgs = ((self.vq.fhat_to_img(f_hat.to(dtype)).float() + 1) / 2).clamp(0, 1).cpu()
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

    def _pick_codes(self, logits_nlV: torch.Tensor, samples: list[int], k: int) -> torch.Tensor:
        cfg = self.cfg
        if cfg.top_k == 1:
            codes = logits_nlV.argmax(-1)
        else:
            probs = filter_top_k_top_p(logits_nlV, cfg.top_k, cfg.top_p).softmax(-1)
            l = logits_nlV.shape[1]
            u = torch.stack([torch.rand(l, generator=self.replies[r].generator, device=self.device) for r in samples])
            codes = _inverse_cdf(probs, u)
        for i, r in enumerate(samples):
            reply = self.replies[r]
            if reply.forced_codes is not None and not reply.images:
                codes[i] = reply.forced_codes[k].to(codes).view(-1)
        return codes

    # ------------------------------------------------------------------ the loop
    def run(self, prompts: list[_Prompt], forced: list[bool]) -> list[GenerationOutput]:
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

    def _finish(self, reply: _Reply, prompt_ids: list[int]) -> GenerationOutput:
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


def _inverse_cdf(probs_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """Draw one index per row from ``probs`` given uniforms in [0, 1): the first index whose cumulative mass
    exceeds ``u`` times the total. Batched, with each row's uniforms from that row's own generator."""
    cdf_BlV = probs_BlV.float().cumsum(-1)
    target_Bl1 = u_Bl[..., None].to(cdf_BlV.dtype) * cdf_BlV[..., -1:]
    return torch.searchsorted(cdf_BlV, target_Bl1, right=True).squeeze(-1).clamp_(max=probs_BlV.shape[-1] - 1)
