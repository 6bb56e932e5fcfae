"""The sample record of the shard format, and the checks that every writer and reader applies to it.

A record is the LLaMA-Factory "sharegpt" schema VARGPT's data uses (ARCHITECTURE.md, VARGPT-REFERENCE.md 6):
``messages`` = ``[{role: system|user|assistant, content}]`` with ``<image>`` in user turns (an input image) and
``<image_gen>`` in assistant turns (an image to generate), and ``images`` = the image member names of the sample
in placeholder order. A preference pair (:func:`check_pair`) is one record too: ``messages`` holds the prompt turns
(ending on a user turn), ``chosen`` and ``rejected`` one assistant message each, and ``images`` the prompt's images,
then chosen's, then rejected's. Anything that breaks these rules raises :class:`InvalidSampleError` with a short
machine-readable ``reason``, so converters and the streaming pipeline can skip the sample and count it by reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# The placeholders of the record format: the same strings as vargpt.tokens (a test keeps them equal),
# defined here because importing vargpt.model loads the whole model stack (torch, transformers: seconds),
# which conversion scripts and their spawned workers must not pay.
IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"

# Skip reasons (keys of ``skipped_by_reason`` in manifests and of the pipeline's skip counters).
EMPTY_CONVERSATION = "empty_conversation"
MALFORMED_CONVERSATION = "malformed_conversation"
MALFORMED_ENTRY = "malformed_entry"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
NON_UTF8 = "non_utf8"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TRUNCATED = "image_truncated"
TOO_LONG = "too_long"
READ_ERROR = "read_error"
CODES_MISSING = "codes_missing"
# Preference pairs: a pair whose structure is wrong; chosen and rejected alike (text and images); a record that is not
# a pair where pairs are expected (data.pairs); a pair where a conversation is expected.
MALFORMED_PAIR = "malformed_pair"
IDENTICAL_PAIR = "identical_pair"
NOT_A_PAIR = "not_a_pair"
UNEXPECTED_PAIR = "unexpected_pair"
# A pair compared on its images (data.pair_target=image) whose chosen or rejected response generates none.
NO_IMAGE_TARGET = "no_image_target"
# The record fields of a pair's two responses, in the order their images are listed.
PAIR_SIDES = ("chosen", "rejected")

IMAGE = "image"
IMAGE_GEN = "image_gen"
PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_GEN_PLACEHOLDER)}|{re.escape(IMAGE_PLACEHOLDER)})")
_KIND_OF = {IMAGE_PLACEHOLDER: IMAGE, IMAGE_GEN_PLACEHOLDER: IMAGE_GEN}
# LLaVA spells turns {from: human|gpt, value}; VARGPT's own files {role: user|assistant, content}.
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class InvalidSampleError(ValueError):
    """A sample that must be skipped; ``reason`` is one of the constants above (counted), ``detail`` is for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Pickled into converter workers: keep reason and detail apart (the default would merge them).
        return (InvalidSampleError, (self.reason, self.detail))


def as_text(value: Any, what: str) -> str:
    """``value`` as a str, valid UTF-8: bytes are decoded strictly, lone surrogates (from escapes) are refused."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidSampleError(NON_UTF8, f"{what}: {exc}") from None
    if not isinstance(value, str):
        raise InvalidSampleError(MALFORMED_CONVERSATION, f"{what} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidSampleError(NON_UTF8, f"{what}: {exc}") from None
    return value


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """Turns in either spelling (``role/content`` or ``from/value``) as ``[{role, content}]`` with canonical roles."""
    if not isinstance(raw, list) or not raw:
        raise InvalidSampleError(EMPTY_CONVERSATION, "no turns")
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise InvalidSampleError(MALFORMED_CONVERSATION, f"turn {i} is {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLE_ALIASES:
            raise InvalidSampleError(MALFORMED_CONVERSATION, f"turn {i} has role {role!r}")
        out.append({"role": _ROLE_ALIASES[role], "content": as_text(content, f"turn {i}")})
    return out


def placeholder_kinds(messages: list[dict[str, str]], open_end: bool = False) -> list[str]:
    """Check the turn structure and return the kind (``image``/``image_gen``) of every placeholder, in order.

    Structure: an optional leading system turn, then user/assistant alternating from a user turn, ending on an
    assistant turn (training) or on a user turn when ``open_end`` (a prompt awaiting the model's answer).
    ``<image>`` may only appear in user turns and ``<image_gen>`` only in assistant turns.
    """
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise InvalidSampleError(EMPTY_CONVERSATION, "no user turn")
    kinds: list[str] = []
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise InvalidSampleError(MALFORMED_CONVERSATION, f"turn {i} is {turn['role']}, expected {expected}")
        if not turn["content"].strip():
            raise InvalidSampleError(EMPTY_CONVERSATION, f"turn {i} is empty")
        for placeholder in PLACEHOLDER_RE.findall(turn["content"]):
            kind = _KIND_OF[placeholder]
            if (kind == IMAGE) != (expected == "user"):
                raise InvalidSampleError(PLACEHOLDER_MISMATCH, f"{placeholder} in a {expected} turn")
            kinds.append(kind)
    last = turns[-1]["role"]
    if last != ("user" if open_end else "assistant"):
        raise InvalidSampleError(MALFORMED_CONVERSATION, f"conversation ends on a {last} turn")
    return kinds


def check_record(messages: list[dict[str, str]], num_images: int) -> list[str]:
    """Validate a training record: structure plus one image per placeholder. Returns the placeholder kinds."""
    kinds = placeholder_kinds(messages)
    if len(kinds) != num_images:
        raise InvalidSampleError(PLACEHOLDER_MISMATCH, f"{len(kinds)} placeholders, {num_images} images")
    return kinds


def is_pair(record: dict[str, Any]) -> bool:
    """Whether a record is a preference pair (has a ``chosen`` or a ``rejected`` response)."""
    return any(side in record for side in PAIR_SIDES)


def normalize_response(raw: Any, side: str) -> dict[str, str]:
    """A pair's ``chosen`` or ``rejected`` (one assistant message, either spelling) as ``{role, content}``."""
    if not isinstance(raw, dict):
        raise InvalidSampleError(MALFORMED_PAIR, f"{side} is {type(raw).__name__}, not one message")
    (message,) = normalize_messages([raw])
    if message["role"] != "assistant":
        raise InvalidSampleError(MALFORMED_PAIR, f"{side} is a {message['role']} message, not an assistant one")
    return message


@dataclass(frozen=True)
class PairLayout:
    """How a pair's ``images`` split: the prompt's first, then chosen's, then rejected's (counts)."""

    prompt: int
    chosen: int
    rejected: int

    def split(self, items: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        """``items`` (one per image, in ``images`` order) as (prompt's, chosen's, rejected's)."""
        a, b = self.prompt, self.prompt + self.chosen
        return items[:a], items[a:b], items[b:]

    def rows(self, items: list[Any]) -> tuple[list[Any], list[Any]]:
        """``items`` as the chosen row's (prompt's + chosen's) and the rejected row's (prompt's + rejected's)."""
        prompt, chosen, rejected = self.split(items)
        return prompt + chosen, prompt + rejected


def check_pair(
    prompt: list[dict[str, str]], chosen: dict[str, str], rejected: dict[str, str], images: list[Any]
) -> PairLayout:
    """Validate a preference pair (normalised turns) against its images; returns how the images split.

    The prompt is a conversation awaiting the model's answer (ends on a user turn) whose placeholders are all
    ``<image>``: generation targets belong to the responses only, so a row's every target is what the pair compares.
    ``images`` are anything that identifies the images (names, or better their bytes): a pair whose responses have the
    same text and the same images compares nothing and is ``identical_pair``.
    """
    if prompt[-1]["role"] != "user":
        raise InvalidSampleError(MALFORMED_PAIR, f"the prompt's last turn is {prompt[-1]['role']}, not user")
    prompt_kinds = placeholder_kinds(prompt, open_end=True)
    if IMAGE_GEN in prompt_kinds:
        raise InvalidSampleError(MALFORMED_PAIR, f"{IMAGE_GEN_PLACEHOLDER} in the prompt: only responses generate")
    chosen_n, rejected_n = (len(placeholder_kinds([*prompt, side])) - len(prompt_kinds) for side in (chosen, rejected))
    layout = PairLayout(len(prompt_kinds), chosen_n, rejected_n)
    placeholders = layout.prompt + layout.chosen + layout.rejected
    if placeholders != len(images):
        raise InvalidSampleError(PLACEHOLDER_MISMATCH, f"{placeholders} placeholders, {len(images)} images")
    _, chosen_images, rejected_images = layout.split(images)
    if chosen["content"] == rejected["content"] and chosen_images == rejected_images:
        raise InvalidSampleError(IDENTICAL_PAIR, "chosen and rejected have the same text and images")
    return layout
