"""The shapes world's tokenizer (trained here, offline) and the loader every run uses for its tokenizer.

The world's tokenizer is a small BPE trained with the ``tokenizers`` library on the world's text. It behaves
like the Llama tokenizer of the release where it matters: a SentencePiece-style word boundary (``▁``) at the
start of every separately encoded piece, ``<unk>``, ``<s>``, ``</s>``, ``<pad>``, ``<image>`` as special tokens,
then ``<|image_gen_start|>``, ``<|image_gen_end|>``, ``<|image_gen_pad|>`` added last, in that order (the
release's ids 32002-32004 are likewise its last three). Real runs load the LLM checkpoint's tokenizer from a
local folder; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vargpt.tokens import GEN_TOKENS, IMAGE_TOKEN, PAD_TOKEN, SpecialTokenIds

log = logging.getLogger(__name__)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BASE_SPECIAL_TOKENS = (UNK, BOS, EOS, PAD_TOKEN, IMAGE_TOKEN)


def train_world_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000) -> Any:
    """Train a BPE tokenizer on ``texts``, save it in the HF format under ``out_dir`` and return it.

    ``vocab_size`` is an upper bound including the 8 special tokens; a small world stops merging earlier.
    Every printable ASCII character is in the alphabet, so any ASCII text (held-out wording too) encodes
    without ``<unk>``.
    """
    if vocab_size < len(BASE_SPECIAL_TOKENS) + len(GEN_TOKENS) + len(string.printable) + 1:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the special tokens and the ASCII alphabet")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Whitespace-split words with a leading "▁", as SentencePiece does: merges never cross words, so an unseen
    # combination of seen words ("purple circle") is tokenised exactly like the seen ones.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(GEN_TOKENS),
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=list(string.printable),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama: tokenizer(text) with the default add_special_tokens=True prepends <s>; the chat template
    # always passes add_special_tokens=False (no BOS in training, reference 3).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD_TOKEN)
    hf.add_special_tokens({"additional_special_tokens": list(GEN_TOKENS)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    log.info("trained the world tokenizer: %d tokens, saved to %s", len(hf), out_dir)
    return hf


def load_tokenizer(path: str | Path) -> Any:
    """Load an HF tokenizer from a local folder and check it holds VARGPT's special tokens.

    Raises FileNotFoundError for a missing folder (never falls back to a hub download) and ValueError naming
    the missing special token otherwise.
    """
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer at {folder} (expected a local folder with tokenizer.json): build the shapes world "
            "(data_prep/make_shapes.py) or point model.tokenizer at the LLM checkpoint's local folder"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    SpecialTokenIds.from_tokenizer(tokenizer)
    return tokenizer
