"""The chat template, tokenisation, placeholder expansion and label masking: one function for every caller.

Training, evaluation and generation all build their token ids with :func:`tokenize_conversation`, so a prompt
cannot drift between them (VARGPT-REFERENCE.md 3 and 9.11). The format is the release's training format,
LLaMA-Factory's ``vargpt_llava`` template (= ``vicuna``) with its ``VargptLlavaPlugin``, rebuilt step by step so
that the ids equal the release's for any tokenizer:

1. Placeholders are expanded INSIDE the message string (``VargptLlavaPlugin.process_messages``): ``<image>``
   becomes ``num_image_tokens`` copies of the image token string, ``<image_gen>`` becomes
   ``<|image_gen_start|>`` + ``num_gen_tokens`` x ``<|image_gen_pad|>`` + ``<|image_gen_end|>``.
2. The template's elements are encoded one by one with ``add_special_tokens=False``
   (``Template._convert_elements_to_ids``): the system text, ``USER: {content} ASSISTANT:`` for a user turn,
   the assistant ``{content}``, then the eos id appended as an id. Empty elements are skipped. No BOS::

    {system} USER: {turn 1} ASSISTANT: {answer 1}</s>USER: {turn 2} ASSISTANT: {answer 2}</s>

The text next to a placeholder is never split or stripped: with a Llama tokenizer ``USER: <image>\\nWhat``
keeps its ``▁`` before the image block and its ``<0x0A>`` after it, as in the release.

Labels are -100 on system and user elements (image tokens included) and on gen pads; assistant text,
gen_start, gen_end and ``</s>`` are trained (the release's bug of training prompts in generation batches is not
copied, reference 9.1). Image and generation blocks are found back from the ids, so truncation never cuts one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vargpt.data.records import (
    IMAGE,
    IMAGE_GEN,
    IMAGE_PLACEHOLDER,
    MALFORMED_CONVERSATION,
    PLACEHOLDER_RE,
    TOO_LONG,
    InvalidSampleError,
    placeholder_kinds,
)
from vargpt.tokens import SpecialTokenIds

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IGNORE_INDEX = -100
USER_SLOT = "USER: {content} ASSISTANT:"


@dataclass
class TokenizedConversation:
    """Token ids and labels of one conversation, with the images its kept placeholders refer to."""

    input_ids: list[int]
    labels: list[int]
    num_images: int  # understanding images (``<image>`` blocks) kept
    num_gen_images: int  # generation targets (``<image_gen>`` blocks) kept
    # Kind of every kept placeholder in order (``image`` / ``image_gen``): the sample's first
    # ``len(image_kinds)`` images, split by kind, are the ones the batch needs.
    image_kinds: list[str] = field(default_factory=list)
    truncated: bool = False


@dataclass
class _Block:
    """A placeholder's id span [start, end): never cut by truncation."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class _Expansion:
    """The strings placeholders expand to, from the tokenizer's own token strings of ``ids``."""

    image: str  # one <image> placeholder's expansion
    gen: str  # one <image_gen> placeholder's expansion
    reserved: tuple[str, ...]  # special-token strings that data text may not contain

    @classmethod
    def of(cls, tokenizer: Any, ids: SpecialTokenIds, num_image_tokens: int, num_gen_tokens: int) -> _Expansion:
        image, start, pad, end = tokenizer.convert_ids_to_tokens([ids.image, ids.gen_start, ids.gen_pad, ids.gen_end])
        return cls(image * num_image_tokens, start + pad * num_gen_tokens + end, (image, start, pad, end))

    def expand(self, content: str) -> str:
        """``content`` with its placeholders expanded in place (``VargptLlavaPlugin.process_messages``).

        A literal special-token string in the raw text would become an image slot that no image fills, so it
        makes the sample invalid; the check runs on the text between placeholders, before expansion.
        """
        for text in PLACEHOLDER_RE.split(content)[::2]:  # split keeps the placeholders at odd indices
            literal = next((token for token in self.reserved if token in text), None)
            if literal is not None:
                raise InvalidSampleError(MALFORMED_CONVERSATION, f"text contains the special token {literal!r}")
        return PLACEHOLDER_RE.sub(self._replacement, content)

    def _replacement(self, placeholder: re.Match[str]) -> str:
        return self.image if placeholder.group() == IMAGE_PLACEHOLDER else self.gen


def _elements(system: str, turns: list[dict[str, str]], expansion: _Expansion) -> list[tuple[str, bool]]:
    """The template's string elements as ``(text, is_assistant)``, in order (``Template._encode``)."""
    out = [(system, False)] if system else []
    for turn in turns:
        content = expansion.expand(turn["content"])
        if turn["role"] == "user":
            out.append((USER_SLOT.format(content=content), False))
        else:
            out.append((content, True))
    return out


def _encode(elements: list[tuple[str, bool]], tokenizer: Any, ids: SpecialTokenIds) -> tuple[list[int], list[int]]:
    """Ids and labels of the elements, each encoded on its own; ``</s>`` after every assistant element."""
    # One tokenizer call for all elements: encode_batch gives each element the ids of its own call.
    encoded = tokenizer([text for text, _ in elements], add_special_tokens=False)["input_ids"] if elements else []
    input_ids: list[int] = []
    labels: list[int] = []
    for (_, is_assistant), token_ids in zip(elements, encoded, strict=True):
        if is_assistant:
            token_ids = [*token_ids, ids.eos]
            labels += [IGNORE_INDEX if t == ids.gen_pad else t for t in token_ids]
        else:
            labels += [IGNORE_INDEX] * len(token_ids)
        input_ids += token_ids
    return input_ids, labels


def _find_blocks(
    input_ids: list[int], ids: SpecialTokenIds, num_image_tokens: int, num_gen_tokens: int
) -> list[_Block]:
    """The image blocks (``num_image_tokens`` image ids each) and generation blocks (gen_start..gen_end) in order."""
    blocks: list[_Block] = []
    i = 0
    while i < len(input_ids):
        if input_ids[i] == ids.image:
            blocks.append(_Block(i, i + num_image_tokens, IMAGE))
        elif input_ids[i] == ids.gen_start:
            blocks.append(_Block(i, i + num_gen_tokens + 2, IMAGE_GEN))
        else:
            i += 1
            continue
        i = blocks[-1].end
    return blocks


def _safe_cut(blocks: list[_Block], cutoff_len: int) -> int:
    """The largest length <= cutoff_len that does not fall inside an image or generation block."""
    for block in blocks:
        if block.start < cutoff_len < block.end:
            return block.start
    return cutoff_len


def _truncate(
    input_ids: list[int], labels: list[int], blocks: list[_Block], cutoff_len: int | None, can_truncate: bool
) -> TokenizedConversation:
    """Cut the sequence at ``cutoff_len`` (at a block boundary), keeping the placeholders wholly inside."""
    cut = len(input_ids)
    if cutoff_len is not None and cut > cutoff_len:
        if not can_truncate:
            raise InvalidSampleError(TOO_LONG, f"prompt of {cut} tokens > cutoff {cutoff_len}")
        cut = _safe_cut(blocks, cutoff_len)
    kept = [b.kind for b in blocks if b.end <= cut]
    if can_truncate and all(label == IGNORE_INDEX for label in labels[:cut]):
        raise InvalidSampleError(TOO_LONG, f"{len(input_ids)} tokens, nothing trained within {cutoff_len}")
    return TokenizedConversation(
        input_ids=input_ids[:cut],
        labels=labels[:cut],
        num_images=kept.count(IMAGE),
        num_gen_images=kept.count(IMAGE_GEN),
        image_kinds=kept,
        truncated=cut < len(input_ids),
    )


def tokenize_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    ids: SpecialTokenIds,
    num_image_tokens: int,
    num_gen_tokens: int,
    cutoff_len: int | None = None,
    add_generation_prompt: bool = False,
    system: str | None = None,
) -> TokenizedConversation:
    """Token ids and labels of a conversation in VARGPT's training chat format (the release's ids).

    Args:
        messages: ``[{role, content}]`` (canonical roles, see ``records.normalize_messages``); an optional
            leading system turn, then user/assistant turns.
        tokenizer: an HF tokenizer holding the special tokens of ``ids``.
        ids: the special token ids (``SpecialTokenIds.from_tokenizer``).
        num_image_tokens: tokens per ``<image>`` (``ModelConfig.vision.num_image_tokens``).
        num_gen_tokens: pad tokens per ``<image_gen>`` (``ModelConfig.vqvae.schedule.num_tokens``, L).
        cutoff_len: longest sequence; a longer one is cut at the cutoff, moved back to the start of any image
            or generation block the cut would fall into (the block and its image are dropped whole). A sample
            with nothing left to train on raises ``InvalidSampleError(too_long)``.
        add_generation_prompt: the messages end on a user turn and the result is the prompt ending with
            ``ASSISTANT:`` for the model to continue (inference); a prompt over the cutoff raises instead of
            being cut.
        system: system text; None = the conversation's own system turn, else :data:`SYSTEM_PROMPT`; "" = none.
    """
    kinds = placeholder_kinds(messages, open_end=add_generation_prompt)
    turns = messages
    if messages[0]["role"] == "system":
        system = messages[0]["content"] if system is None else system
        turns = messages[1:]
    system = SYSTEM_PROMPT if system is None else system

    expansion = _Expansion.of(tokenizer, ids, num_image_tokens, num_gen_tokens)
    input_ids, labels = _encode(_elements(system, turns, expansion), tokenizer, ids)
    blocks = _find_blocks(input_ids, ids, num_image_tokens, num_gen_tokens)
    if [b.kind for b in blocks] != kinds:  # the tokenizer merged or split a special token: images would misalign
        raise InvalidSampleError(
            MALFORMED_CONVERSATION, f"{len(blocks)} image blocks in the ids, {len(kinds)} placeholders"
        )
    return _truncate(input_ids, labels, blocks, cutoff_len, can_truncate=not add_generation_prompt)
