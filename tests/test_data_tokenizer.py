"""The shapes world's tokenizer and the local-only tokenizer loader (vargpt.data.tokenizer)."""

from __future__ import annotations

import pytest
from fixtures.data import tiny_world, world_tokenizer

from vargpt.data.shapes import T2I_PROMPTS, VQA_PROMPTS
from vargpt.data.tokenizer import load_tokenizer, train_world_tokenizer
from vargpt.tokens import GEN_TOKENS, SpecialTokenIds


def test_special_tokens_in_the_release_order():
    tokenizer = world_tokenizer()
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # The three generation tokens are added last, in the release's order (its 32002-32004).
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - 3, len(tokenizer)))) == list(GEN_TOKENS)
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    assert (tokenizer.unk_token_id, ids.bos, ids.eos, ids.pad, ids.image) == (0, 1, 2, 3, 4)
    assert len(tokenizer) <= 1024  # fits the tiny LLM's vocab_size


def test_encoding_round_trip_and_bos_like_llama():
    tokenizer = world_tokenizer()
    text = "Here is a red circle on a white background."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id, *ids]
    # Special tokens are atomic in text.
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"][-1] == 4


def test_held_out_wordings_encode_without_unknowns():
    tokenizer = world_tokenizer()
    held_out = [w for kind in VQA_PROMPTS.values() for w in kind[1]] + list(T2I_PROMPTS[1])
    for text in held_out + ["Zebra! ~{weird} #42"]:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_train_and_reload(tmp_path):
    hf = train_world_tokenizer(["a red circle", "a blue square"] * 50, tmp_path / "tok", vocab_size=200)
    again = load_tokenizer(tmp_path / "tok")
    assert len(again) == len(hf) <= 200
    assert (
        again("a red circle", add_special_tokens=False)["input_ids"]
        == hf("a red circle", add_special_tokens=False)["input_ids"]
    )


def test_load_tokenizer_is_local_only_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_tokenizer("lmsys/vicuna-7b-v1.5")  # a hub id is never fetched
    assert load_tokenizer(tiny_world() / "tokenizer") is not None
