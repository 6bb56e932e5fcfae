"""The chat template, tokenisation, placeholder expansion and label masking: one function for every caller.

Training, evaluation and generation all build their token ids with :func:`tokenize_conversation`, so a prompt
cannot drift between them (VARGPT-REFERENCE.md 3 and 9.11). The format is VARGPT's training template (Vicuna v1,
LLaMA-Factory ``vargpt_llava``)::

    {system} USER: {turn 1} ASSISTANT: {answer 1}</s>USER: {turn 2} ASSISTANT: {answer 2}</s>

with no BOS, every slot tokenised on its own with ``add_special_tokens=False``. Placeholders become id blocks:
``<image>`` -> ``num_image_tokens`` x the image token; ``<image_gen>`` -> gen_start + ``num_gen_tokens`` x gen_pad +
gen_end. Text is split at placeholders and each piece is stripped of the whitespace next to them, because the
tokenizers we use (SentencePiece-style) put a word boundary at the start of every separately encoded piece.

Labels are -100 on system and user text, image tokens and gen pads; assistant text, gen_start, gen_end and
``</s>`` are trained (the release's bug of training prompts in generation batches is not copied, reference 9.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # the model package is heavy to import; the chat template only needs the ids
    from vargpt.model.tokens import SpecialTokenIds

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IGNORE_INDEX = -100


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


# Marks the end of an assistant turn in the slot list (becomes </s>).
_EOS = object()


def _pieces(system: str, turns: list[dict[str, str]]) -> list[tuple[Any, bool]]:
    """The conversation as ``(piece, trained)`` in order: text pieces, placeholders and end-of-turn marks."""
    out: list[tuple[Any, bool]] = []
    if system.strip():
        out.append((system.strip(), False))
    for turn in turns:
        user = turn["role"] == "user"
        for piece in PLACEHOLDER_RE.split(f"USER: {turn['content']} ASSISTANT:" if user else turn["content"]):
            if piece.strip():
                out.append((piece.strip(), not user))
        if not user:
            out.append((_EOS, True))
    return out


class _Builder:
    """Lays out ids, labels and placeholder blocks from the pieces of a conversation."""

    def __init__(self, ids: SpecialTokenIds, num_image_tokens: int, num_gen_tokens: int) -> None:
        self.ids = ids
        self.num_image_tokens = num_image_tokens
        self.num_gen_tokens = num_gen_tokens
        self.input_ids: list[int] = []
        self.labels: list[int] = []
        self.blocks: list[_Block] = []

    def add(self, token_ids: list[int], train: bool) -> None:
        self.input_ids += token_ids
        self.labels += token_ids if train else [IGNORE_INDEX] * len(token_ids)

    def block(self, kind: str, train: bool) -> None:
        """An image block (never trained) or a generation block (start and end trained, pads not)."""
        start = len(self.input_ids)
        if kind == IMAGE:
            self.add([self.ids.image] * self.num_image_tokens, train=False)
        else:
            self.add([self.ids.gen_start], train)
            self.add([self.ids.gen_pad] * self.num_gen_tokens, train=False)
            self.add([self.ids.gen_end], train)
        self.blocks.append(_Block(start, len(self.input_ids), kind))

    def build(self, pieces: list[tuple[Any, bool]], tokenizer: Any) -> None:
        texts = [p for p, _ in pieces if p is not _EOS and not PLACEHOLDER_RE.fullmatch(p)]
        # One tokenizer call for every text piece: the per-call overhead dominates short pieces.
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        reserved = {self.ids.image, self.ids.gen_start, self.ids.gen_end, self.ids.gen_pad}
        for piece, train in pieces:
            if piece is _EOS:
                self.add([self.ids.eos], train)
            elif PLACEHOLDER_RE.fullmatch(piece):
                self.block(IMAGE if piece == IMAGE_PLACEHOLDER else IMAGE_GEN, train)
            else:
                token_ids = next(encoded)
                # A literal special-token string in the data would inject an unaccounted image slot.
                if reserved.intersection(token_ids):
                    raise InvalidSampleError(MALFORMED_CONVERSATION, "text contains an image special token")
                self.add(token_ids, train)

    def finish(self, cutoff_len: int | None, can_truncate: bool) -> TokenizedConversation:
        cut = len(self.input_ids)
        if cutoff_len is not None and cut > cutoff_len:
            if not can_truncate:
                raise InvalidSampleError(TOO_LONG, f"prompt of {cut} tokens > cutoff {cutoff_len}")
            cut = _safe_cut(self.blocks, cutoff_len)
        kept = [b.kind for b in self.blocks if b.end <= cut]
        labels = self.labels[:cut]
        if can_truncate and all(label == IGNORE_INDEX for label in labels):
            raise InvalidSampleError(TOO_LONG, f"{len(self.input_ids)} tokens, nothing trained within {cutoff_len}")
        return TokenizedConversation(
            input_ids=self.input_ids[:cut],
            labels=labels,
            num_images=kept.count(IMAGE),
            num_gen_images=kept.count(IMAGE_GEN),
            image_kinds=kept,
            truncated=cut < len(self.input_ids),
        )


def _safe_cut(blocks: list[_Block], cutoff_len: int) -> int:
    """The largest length <= cutoff_len that does not fall inside an image or generation block."""
    for block in blocks:
        if block.start < cutoff_len < block.end:
            return block.start
    return cutoff_len


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
    """Token ids and labels of a conversation in VARGPT's chat format.

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
    placeholder_kinds(messages, open_end=add_generation_prompt)
    turns = messages
    if messages[0]["role"] == "system":
        system = messages[0]["content"] if system is None else system
        turns = messages[1:]
    system = SYSTEM_PROMPT if system is None else system

    builder = _Builder(ids, num_image_tokens, num_gen_tokens)
    builder.build(_pieces(system, turns), tokenizer)
    return builder.finish(cutoff_len, can_truncate=not add_generation_prompt)
