"""A tiny Llama-style (legacy SentencePiece) tokenizer, trained in-process, for token-exact template tests.

The release's LLM tokenizer is Llama's: byte-fallback BPE, a ``Prepend('▁')`` + ``Replace(' ', '▁')``
normaliser, no pre-tokenizer, ``<s>`` prepended by the post-processor, then LLaVA's ``<image>`` / ``<pad>`` and
VARGPT's three generation tokens added as special tokens. It is whitespace-sensitive the way the release's is:
``"USER: <image>\\nWhat"`` keeps a lone ``▁`` before ``<image>`` and a ``<0x0A>`` after it, which is what
exposes templates that split or strip text at placeholders. The vocabulary is trained on a few sentences, so
the ids are small and readable; ``<unk>``, ``<s>``, ``</s>`` are 0, 1, 2 and the 256 byte tokens 3..258 as in
Llama.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from vargpt.data.chat import SYSTEM_PROMPT
from vargpt.tokens import GEN_END_TOKEN, GEN_PAD_TOKEN, GEN_START_TOKEN, IMAGE_TOKEN, PAD_TOKEN

BASE_SPECIALS = ("<unk>", "<s>", "</s>")
# Appended after the trained vocabulary in the release's order (VARGPT-REFERENCE.md 1.3).
ADDED_SPECIALS = (IMAGE_TOKEN, PAD_TOKEN, GEN_START_TOKEN, GEN_END_TOKEN, GEN_PAD_TOKEN)
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
# No newline in the corpus: "\n" is then outside the vocabulary and falls back to <0x0A>, as in Llama.
CORPUS = (
    SYSTEM_PROMPT,
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "USER: Describe the picture. ASSISTANT: There is a green triangle on the left.",
    "USER: Draw a yellow star. ASSISTANT: Here is a yellow star. Here it is.",
    "USER: What color is the circle? ASSISTANT: red. Now draw it in blue. Same shape? yes",
)
VOCAB_SIZE = 400


def _train_merges() -> tuple[list[str], list[str]]:
    """Vocabulary and merges of a BPE trained on :data:`CORPUS` with word boundaries at ``▁`` like SentencePiece.

    Training splits before every ``▁`` so that no merge crosses a word boundary (SentencePiece's pieces never
    do); the final tokenizer has no pre-tokenizer, as Llama's tokenizer.json.
    """
    trainer_tok = Tokenizer(BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer_tok.train_from_iterator(CORPUS, BpeTrainer(vocab_size=VOCAB_SIZE, show_progress=False))
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    return vocab, model["merges"]


def _build() -> Tokenizer:
    """The Llama-layout ``tokenizers`` object: specials 0-2, bytes 3-258, trained pieces, then added tokens."""
    pieces, merges = _train_merges()
    vocab = {token: i for i, token in enumerate([*BASE_SPECIALS, *BYTE_TOKENS, *pieces])}
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True))
    tok.model.fuse_unk = True
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = _bos_processor(vocab["<s>"])
    tok.add_special_tokens([*BASE_SPECIALS, *ADDED_SPECIALS])
    return tok


def _bos_processor(bos_id: int) -> TemplateProcessing:
    """Llama's post-processor: ``<s>`` before the text when ``add_special_tokens=True``."""
    return TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])


@functools.cache
def llama_style_tokenizer(tmp_path_or_None: Path | str | None = None) -> PreTrainedTokenizerFast:
    """The tiny Llama-style tokenizer (cached); with a folder, it is also saved there and loaded back from it.

    Args:
        tmp_path_or_None: a folder to ``save_pretrained`` into (for code that loads a tokenizer by path); the
            returned tokenizer is then the one read back from disk.
    """
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_build(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=PAD_TOKEN
    )
    if tmp_path_or_None is None:
        return fast
    fast.save_pretrained(str(tmp_path_or_None))
    return PreTrainedTokenizerFast.from_pretrained(str(tmp_path_or_None))
