"""Preference pairs through the data pipeline (``data.pairs``): a pair record -> a :class:`PairExample` of two rows.

A pair record (``records.check_pair``) holds the prompt turns, a ``chosen`` and a ``rejected`` response, and the
images of all three in that order. Each row is the prompt plus one response, tokenised and transformed exactly as a
conversation (:class:`vargpt.data.pipeline.SampleProcessor`: the same ids, the same generation targets as pixels or
codes), with the prompt's images in both rows and each response's images in its own row only. Labels are -100 over
the whole prompt (earlier assistant turns included, as LLaMA-Factory's pairwise data does), so they mark the response
alone. A pair is compared on whole responses: one whose row would be cut by ``data.cutoff_len`` is skipped as
``too_long``. The optional ``ref_logps`` (the reference model's summed log-probs, precomputed) travel with the pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vargpt.data.chat import IGNORE_INDEX, tokenize_conversation
from vargpt.data.collate import PairExample
from vargpt.data.pipeline import SampleProcessor
from vargpt.data.records import MALFORMED_PAIR, NO_IMAGE_TARGET, PAIR_SIDES, TOO_LONG, InvalidSampleError
from vargpt.data.shards import parse_pair_record

# The record field of the precomputed reference log-probs: ``{"chosen": float, "rejected": float}``.
REF_LOGPS = "ref_logps"


@dataclass
class PairProcessor:
    """Raw pair sample -> :class:`PairExample`; ``rows`` makes each row as it makes a conversation's example."""

    rows: SampleProcessor
    # "image": both responses must generate an image (data.pair_target).
    target: str | None = None

    def __call__(self, raw: dict[str, Any], source: str) -> PairExample:
        record, images, layout = parse_pair_record(raw, codes_ok=self.rows.gen_codes)
        prompt = record["messages"]
        prompt_len = self._prompt_len(prompt)
        named = list(zip(record["images"], images, strict=True))
        examples = []
        for side, row_images in zip(PAIR_SIDES, layout.rows(named), strict=True):
            example = self.rows.build(raw, record, [*prompt, record[side]], row_images, source)
            if example.meta["truncated"]:
                raise InvalidSampleError(TOO_LONG, f"{raw['__key__']}: the {side} row is over data.cutoff_len")
            example.labels[:prompt_len] = IGNORE_INDEX
            example.meta["pair"] = side
            if self.target == "image" and not example.is_generation:
                raise InvalidSampleError(NO_IMAGE_TARGET, f"{raw['__key__']}: the {side} response generates no image")
            examples.append(example)
        chosen, rejected = examples
        return PairExample(chosen, rejected, ref_logps(record, raw["__key__"]))

    def _prompt_len(self, prompt: list[dict[str, str]]) -> int:
        """Tokens of the prompt, which both rows start with (the template encodes each turn on its own)."""
        rows = self.rows
        tok = tokenize_conversation(
            prompt, rows.tokenizer, rows.ids, rows.num_image_tokens, rows.num_gen_tokens, add_generation_prompt=True
        )
        return len(tok.input_ids)


def ref_logps(record: dict[str, Any], key: str) -> tuple[float, float] | None:
    """A pair record's precomputed reference log-probs ``(chosen, rejected)``, or None when it has none."""
    value = record.get(REF_LOGPS)
    if value is None:
        return None
    try:
        pair = tuple(float(value[side]) for side in PAIR_SIDES)
    except (KeyError, TypeError, ValueError):
        raise InvalidSampleError(MALFORMED_PAIR, f"{key}: {REF_LOGPS} is {value!r}, not {{chosen, rejected}}") from None
    if not all(math.isfinite(x) for x in pair):
        raise InvalidSampleError(MALFORMED_PAIR, f"{key}: {REF_LOGPS} {pair} is not finite")
    return pair[0], pair[1]
