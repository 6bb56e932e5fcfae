"""The processor: conversations to prompt ids and pixels, as the model was trained on or as lmms-eval asks.

A prompt has one of two formats, as in the release (VARGPT-REFERENCE.md 3):

* ``prompt_format="training"`` (default): the training template of :mod:`vargpt.data.chat` (elements encoded one
  by one, no BOS), which is what the model was fine-tuned on;
* ``prompt_format="evaluation"``: lmms-eval's VARGPT wrapper and the release's processor: ONE string, the
  tokenizer's own chat template when it has one, else the Vicuna v1 template
  ``{system} USER: {turn} ASSISTANT:``, every ``<image>`` expanded in the string to the image-token run, encoded
  in one tokenizer call with the tokenizer's special tokens (BOS). One user turn, understanding images only.

Images are checked and preprocessed with the data pipeline's own transforms (:mod:`vargpt.data.transforms`):
``<image>`` inputs to CLIP pixels, earlier ``<image_gen>`` images to the VQ-VAE's [-1, 1] pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vargpt.data.chat import SYSTEM_PROMPT, tokenize_conversation
from vargpt.data.records import IMAGE, normalize_messages, placeholder_kinds
from vargpt.data.transforms import clip_transform, read_image_file, var_transform
from vargpt.tokens import IMAGE_PLACEHOLDER, IMAGE_TOKEN, SpecialTokenIds

PROMPT_FORMATS = ("training", "evaluation")


def _is_single_conversation(conversations: Any) -> bool:
    """True for one conversation (a string, a record, or a list of messages), False for a batch of them."""
    if isinstance(conversations, (str, dict)):
        return True
    return (
        isinstance(conversations, (list, tuple))
        and len(conversations) > 0
        and isinstance(conversations[0], dict)
        and ("role" in conversations[0] or "from" in conversations[0])
    )


def as_conversations(conversations: Any, images: Sequence[Any] | None) -> list[tuple[list[dict[str, str]], list]]:
    """Normalise the accepted input forms to [(messages, images)], one per sample, with clear errors."""
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
class Prompt:
    """One conversation ready for the LLM: its prompt ids (image blocks expanded) and its images' pixels."""

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


def prepare_prompt(
    model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], imgs: list, system: str | None, i: int,
    prompt_format: str,
) -> Prompt:  # fmt: skip
    """Tokenise one conversation with the generation prompt and preprocess its images (checked)."""
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
    return Prompt(ids=ids, und_pixels=und, gen_pixels=gen)


def _load_pil(img: Any, where: str) -> Any:
    """A path is decoded to RGB like the data pipeline; a PIL image must already be RGB (no silent alpha drop)."""
    if isinstance(img, (str, Path)):
        return read_image_file(img, f"{where}: {img}")
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"{where}: image mode is {img.mode!r}, expected 'RGB' (convert it: img.convert('RGB'))")
        if min(img.size) < 1:
            raise ValueError(f"{where}: empty image of size {img.size}")
        return img
    raise TypeError(f"{where}: expected a PIL image, a file path or a tensor, got {type(img).__name__}")


def _checked_tensor(img: torch.Tensor, side: int, what: str) -> torch.Tensor:
    """An image given as a tensor, (3, side, side) or (1, 3, side, side) float, as fp32 (3, side, side);
    ``what`` is the error's text, formatted with ``shape`` (what was given)."""
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if tuple(img.shape) != (3, side, side) or not img.is_floating_point():
        raise ValueError(what.format(shape=f"{tuple(img.shape)} {img.dtype}"))
    return img.float()


def _understanding_pixels(model: nn.Module, img: Any, where: str) -> torch.Tensor:
    """An ``<image>`` input as (3, S, S) CLIP-normalised pixels (a tensor is checked, not transformed)."""
    v = model.cfg.vision
    S = v.image_size
    if isinstance(img, torch.Tensor):
        return _checked_tensor(
            img,
            S,
            f"{where}: an input image tensor must be float (3, {S}, {S}), CLIP-normalised (got {{shape}}); pass a "
            "PIL image to have it resized and normalised",
        )
    return clip_transform(S, tuple(v.image_mean), tuple(v.image_std))(_load_pil(img, where))


def _generated_pixels(model: nn.Module, img: Any, where: str) -> torch.Tensor:
    """An earlier ``<image_gen>`` image as (3, R, R) pixels in [-1, 1] (a tensor is checked, not transformed)."""
    R = model.cfg.vqvae.image_size
    if isinstance(img, torch.Tensor):
        return _checked_tensor(
            img, R, f"{where}: an '<image_gen>' image tensor must be float (3, {R}, {R}) in [-1, 1] (got {{shape}})"
        )
    return var_transform(R, train=False)(_load_pil(img, where))


def null_prompt_ids(tokenizer: Any, ids: SpecialTokenIds, num_gen_tokens: int, system: str | None) -> list[int]:
    """The empty instruction of the ``null_prompt`` guidance branch, in the training template.

    The chat template refuses an empty user turn, so the prompt is built from the one template with an
    ``<image>`` as the whole instruction and that image block cut out: the template's text with nothing
    between ``USER:`` and ``ASSISTANT:``.
    """
    tok = tokenize_conversation(
        [{"role": "user", "content": IMAGE_PLACEHOLDER}],
        tokenizer,
        ids,
        1,
        num_gen_tokens,
        add_generation_prompt=True,
        system=system,
    )
    return [t for t in tok.input_ids if t != ids.image]
