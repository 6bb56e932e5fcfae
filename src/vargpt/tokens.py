"""The special tokens VARGPT adds to its LLM's vocabulary, and the placeholders its data uses.

Strings and order follow the release (VARGPT-REFERENCE.md 1.3): LLaVA's ``<image>`` and ``<pad>``, then
``<|image_gen_start|>``, ``<|image_gen_end|>``, ``<|image_gen_pad|>`` added in that order (ids 32002-32004 in
the released 7B tokenizer). Ids are always read from the tokenizer, never hard-coded.

A leaf module (it imports nothing from the package): ``model/``, ``data/``, ``checkpoint/`` and ``inference/``
all read the token ids here, so none of them has to import another for them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
GEN_START_TOKEN = "<|image_gen_start|>"
GEN_END_TOKEN = "<|image_gen_end|>"
GEN_PAD_TOKEN = "<|image_gen_pad|>"
GEN_TOKENS: tuple[str, str, str] = (GEN_START_TOKEN, GEN_END_TOKEN, GEN_PAD_TOKEN)

# Placeholders in the sample records (LLaMA-Factory sharegpt schema): an input image in a user turn, an image
# to generate in an assistant turn.
IMAGE_PLACEHOLDER = "<image>"
IMAGE_GEN_PLACEHOLDER = "<image_gen>"


@dataclass(frozen=True)
class SpecialTokenIds:
    """Token ids the model and the collator need."""

    image: int
    pad: int
    gen_start: int
    gen_end: int
    gen_pad: int
    eos: int
    bos: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        """Read the ids from an HF tokenizer; a missing special token is an error naming it."""
        ids = {}
        for field, tok in (
            ("image", IMAGE_TOKEN),
            ("pad", PAD_TOKEN),
            ("gen_start", GEN_START_TOKEN),
            ("gen_end", GEN_END_TOKEN),
            ("gen_pad", GEN_PAD_TOKEN),
        ):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer lacks the special token {tok!r} (needed for {field})")
            ids[field] = int(tid)
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token (the chat template ends every assistant turn with it)")
        bos = tokenizer.bos_token_id
        return cls(eos=int(tokenizer.eos_token_id), bos=None if bos is None else int(bos), **ids)

    def to_released_config(self) -> dict[str, Any]:
        """The ``special_tokens`` dict the released config.json stores."""
        return {
            "image_gen_start": GEN_START_TOKEN,
            "image_gen_start_token_id": self.gen_start,
            "image_gen_end": GEN_END_TOKEN,
            "image_gen_end_token_id": self.gen_end,
            "image_gen_pad": GEN_PAD_TOKEN,
            "image_gen_pad_token_id": self.gen_pad,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
