"""Chat template, placeholder expansion, label masks and truncation (vargpt.data.chat)."""

from __future__ import annotations

import pytest
from fixtures.data import NUM_GEN_TOKENS, NUM_IMAGE_TOKENS, world_ids, world_tokenizer

from vargpt.data.chat import IGNORE_INDEX, SYSTEM_PROMPT, tokenize_conversation
from vargpt.data.records import InvalidSampleError
from vargpt.data.shapes import make_sample_spec


def tok(messages, **kwargs):
    return tokenize_conversation(messages, world_tokenizer(), world_ids(), NUM_IMAGE_TOKENS, NUM_GEN_TOKENS, **kwargs)


def encode(text: str) -> list[int]:
    return world_tokenizer()(text, add_special_tokens=False)["input_ids"]


def decode_trained(out) -> str:
    trained = [t for t, label in zip(out.input_ids, out.labels, strict=True) if label != IGNORE_INDEX]
    return world_tokenizer().decode(trained, skip_special_tokens=True)


def runs(values: list[int], token: int) -> list[int]:
    """Lengths of the runs of ``token`` in ``values``."""
    out, n = [], 0
    for v in [*values, None]:
        if v == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


MULTI = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Now draw it in blue."},
    {"role": "assistant", "content": "Here is a blue circle.<image_gen>"},
    {"role": "user", "content": "<image>\n<image>\nSame shape?"},
    {"role": "assistant", "content": "yes"},
]


def test_understanding_sample_layout_and_labels():
    ids = world_ids()
    out = tok([{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": "A cat."}])
    system = encode(SYSTEM_PROMPT)
    assert out.input_ids[: len(system)] == system  # starts with the system prompt, no BOS
    assert ids.bos not in out.input_ids
    assert runs(out.input_ids, ids.image) == [NUM_IMAGE_TOKENS]
    assert out.input_ids[-1] == ids.eos and out.labels[-1] == ids.eos
    assert (out.num_images, out.num_gen_images, out.image_kinds) == (1, 0, ["image"])
    assert decode_trained(out) == "A cat."
    # Everything before the answer is masked: system, USER:, the image block, the question, ASSISTANT:.
    answer_start = len(out.input_ids) - len(encode("A cat.")) - 1
    assert set(out.labels[:answer_start]) == {IGNORE_INDEX}
    assert out.input_ids[answer_start - len(encode("ASSISTANT:")) : answer_start] == encode("ASSISTANT:")


def test_generation_block_and_labels():
    ids = world_ids()
    out = tok(
        [{"role": "user", "content": "Draw a red circle."}, {"role": "assistant", "content": "Here it is.<image_gen>"}]
    )
    start = out.input_ids.index(ids.gen_start)
    block = out.input_ids[start : start + NUM_GEN_TOKENS + 2]
    assert block == [ids.gen_start] + [ids.gen_pad] * NUM_GEN_TOKENS + [ids.gen_end]
    assert out.input_ids[start + NUM_GEN_TOKENS + 2 :] == [ids.eos]
    labels = out.labels[start : start + NUM_GEN_TOKENS + 3]
    assert labels == [ids.gen_start] + [IGNORE_INDEX] * NUM_GEN_TOKENS + [ids.gen_end, ids.eos]
    assert (out.num_images, out.num_gen_images) == (0, 1)


def test_multi_turn_multi_image_generation_counts_and_masks():
    ids = world_ids()
    out = tok(MULTI)
    assert runs(out.input_ids, ids.image) == [NUM_IMAGE_TOKENS, 2 * NUM_IMAGE_TOKENS]  # adjacent images merge
    assert out.input_ids.count(ids.gen_pad) == NUM_GEN_TOKENS
    assert (out.num_images, out.num_gen_images) == (3, 1)
    assert out.image_kinds == ["image", "image_gen", "image", "image"]
    assert out.input_ids.count(ids.eos) == 3 and out.labels.count(ids.eos) == 3
    # Trained tokens are exactly the three answers (plus gen start/end and the eos after each).
    assert decode_trained(out) == "red Here is a blue circle. yes"
    for token in (ids.image, ids.gen_pad):
        assert all(label == IGNORE_INDEX for t, label in zip(out.input_ids, out.labels, strict=True) if t == token)
    assert len(out.input_ids) == len(out.labels) and not out.truncated


def test_generation_prompt_is_the_training_prefix():
    """Inference prompts are built by the same function and equal the training sequence up to the answer."""
    prompt = tok(MULTI[:-1], add_generation_prompt=True)
    full = tok(MULTI)
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert prompt.input_ids[-len(encode("ASSISTANT:")) :] == encode("ASSISTANT:")
    assert (prompt.num_images, prompt.num_gen_images) == (3, 1) and prompt.image_kinds == full.image_kinds
    with pytest.raises(InvalidSampleError):
        tok(MULTI, add_generation_prompt=True)  # must end on a user turn


def test_system_prompt_choices():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok(msgs, system="").input_ids[: len(encode("USER:"))] == encode("USER:")
    own = tok([{"role": "system", "content": "Be brief."}, *msgs])
    assert own.input_ids[: len(encode("Be brief."))] == encode("Be brief.")
    assert tok(msgs).input_ids[: len(encode(SYSTEM_PROMPT))] == encode(SYSTEM_PROMPT)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        (
            [{"role": "user", "content": "<image_gen> draw"}, {"role": "assistant", "content": "x"}],
            "placeholder_mismatch",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], "placeholder_mismatch"),
        ([{"role": "assistant", "content": "x"}], "malformed_conversation"),
        ([{"role": "user", "content": "hi"}], "malformed_conversation"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "empty_conversation"),
        (
            [{"role": "user", "content": "a <|image_gen_pad|>"}, {"role": "assistant", "content": "x"}],
            "malformed_conversation",
        ),
    ],
)
def test_invalid_conversations_raise_with_reason(messages, reason):
    with pytest.raises(InvalidSampleError) as info:
        tok(messages)
    assert info.value.reason == reason


def test_truncation_never_cuts_an_image_or_generation_block():
    ids = world_ids()
    full = tok(MULTI)
    blocks = [(full.input_ids.index(ids.gen_start), full.input_ids.index(ids.gen_end) + 1)]
    i = 0
    while i < len(full.input_ids):  # image runs, split per image
        if full.input_ids[i] == ids.image:
            blocks.append((i, i + NUM_IMAGE_TOKENS))
            i += NUM_IMAGE_TOKENS
        else:
            i += 1
    skipped = 0
    for cutoff in range(1, len(full.input_ids) + 2):
        try:
            out = tok(MULTI, cutoff_len=cutoff)
        except InvalidSampleError as exc:
            assert exc.reason == "too_long"
            skipped += 1
            continue
        n = len(out.input_ids)
        assert n <= cutoff and out.input_ids == full.input_ids[:n] and out.labels == full.labels[:n]
        assert not any(start < n < end for start, end in blocks), f"cut at {n} inside a block"
        assert out.input_ids.count(ids.image) == out.num_images * NUM_IMAGE_TOKENS
        assert out.input_ids.count(ids.gen_pad) == out.num_gen_images * NUM_GEN_TOKENS
        assert out.input_ids.count(ids.gen_start) == out.input_ids.count(ids.gen_end) == out.num_gen_images
        assert out.image_kinds == full.image_kinds[: len(out.image_kinds)]
        assert out.truncated == (n < len(full.input_ids))
    assert 0 < skipped < len(full.input_ids)  # too short to train anything -> skipped, never an index error


def test_shapes_samples_tokenize_within_the_tiny_context():
    ids = world_ids()
    for task in ("caption", "vqa", "t2i", "mixed"):
        for i in range(20):
            spec = make_sample_spec(task, "train", i, 0)
            out = tok(spec.messages)
            assert out.num_images + out.num_gen_images == len(spec.scenes)
            assert world_tokenizer().unk_token_id not in out.input_ids
            assert len(out.input_ids) < 512 and ids.eos in out.labels


def test_record_placeholders_are_the_model_package_placeholders():
    from vargpt.data import records
    from vargpt.model import tokens

    assert (records.IMAGE_PLACEHOLDER, records.IMAGE_GEN_PLACEHOLDER) == (
        tokens.IMAGE_PLACEHOLDER,
        tokens.IMAGE_GEN_PLACEHOLDER,
    )
