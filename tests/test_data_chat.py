"""Chat template, placeholder expansion, label masks and truncation (vargpt.data.chat).

The exact-id tests build their expectation the way the release does (LLaMA-Factory's ``vargpt_llava`` template
with ``VargptLlavaPlugin``): placeholders expanded inside the release's slot strings, every element encoded on
its own with ``add_special_tokens=False``, ``</s>`` appended as an id, no BOS. They use a Llama-style
whitespace-sensitive tokenizer, where splitting or stripping the text at a placeholder changes the ids.
"""

from __future__ import annotations

import dataclasses

import pytest
from fixtures.data import NUM_GEN_TOKENS, NUM_IMAGE_TOKENS, world_ids, world_tokenizer
from llama_tokenizer import llama_style_tokenizer

from vargpt.data.chat import IGNORE_INDEX, SYSTEM_PROMPT, tokenize_conversation
from vargpt.data.records import InvalidSampleError
from vargpt.data.shapes import make_sample_spec
from vargpt.tokens import SpecialTokenIds

# Small block sizes keep the exact id lists readable.
LLAMA_IMAGE_TOKENS, LLAMA_GEN_TOKENS = 4, 5
RELEASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The release's expansions (VargptLlavaPlugin.process_messages), written out as strings.
IMG = "<image>" * LLAMA_IMAGE_TOKENS
GEN = "<|image_gen_start|>" + "<|image_gen_pad|>" * LLAMA_GEN_TOKENS + "<|image_gen_end|>"


def tok(messages, **kwargs):
    return tokenize_conversation(messages, world_tokenizer(), world_ids(), NUM_IMAGE_TOKENS, NUM_GEN_TOKENS, **kwargs)


def llama_tok(messages, **kwargs):
    tokenizer = llama_style_tokenizer()
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    return tokenize_conversation(messages, tokenizer, ids, LLAMA_IMAGE_TOKENS, LLAMA_GEN_TOKENS, **kwargs)


def release_encoding(elements: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels as LLaMA-Factory builds them from ``(element string, is_answer)``.

    Each element is one ``tokenizer.encode(element, add_special_tokens=False)``; an answer is followed by the
    eos id and trained except its gen pads; everything else is masked.
    """
    tokenizer = llama_style_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|image_gen_pad|>")
    input_ids, labels = [], []
    for text, is_answer in elements:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if is_answer else [])
        input_ids += ids
        labels += [t if is_answer and t != pad else IGNORE_INDEX for t in ids]
    return input_ids, labels


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
    {"role": "user", "content": "<image><image>\nSame shape?"},
    {"role": "assistant", "content": "yes"},
]
USER, ANSWER = False, True
# (messages, the release's elements): one case per placement of a placeholder.
RELEASE_CASES = {
    "image_at_start": (
        [
            {"role": "user", "content": "<image>\nWhat is in the image?"},
            {"role": "assistant", "content": "A red circle."},
        ],
        [(RELEASE_SYSTEM, USER), (f"USER: {IMG}\nWhat is in the image? ASSISTANT:", USER), ("A red circle.", ANSWER)],
    ),
    "image_in_the_middle": (
        [
            {"role": "user", "content": "Describe the picture <image> in one sentence."},
            {"role": "assistant", "content": "There is a green triangle."},
        ],
        [
            (RELEASE_SYSTEM, USER),
            (f"USER: Describe the picture {IMG} in one sentence. ASSISTANT:", USER),
            ("There is a green triangle.", ANSWER),
        ],
    ),
    "image_at_end": (
        [
            {"role": "user", "content": "What is in the image?\n<image>"},
            {"role": "assistant", "content": "A blue square."},
        ],
        [(RELEASE_SYSTEM, USER), (f"USER: What is in the image?\n{IMG} ASSISTANT:", USER), ("A blue square.", ANSWER)],
    ),
    "multi_turn_with_system_turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nWhat color is the circle?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "<image> <image>\nSame shape?"},
            {"role": "assistant", "content": "yes"},
        ],
        [
            ("Be brief.", USER),
            (f"USER: {IMG}\nWhat color is the circle? ASSISTANT:", USER),
            ("red", ANSWER),
            (f"USER: {IMG} {IMG}\nSame shape? ASSISTANT:", USER),
            ("yes", ANSWER),
        ],
    ),
    "gen_inside_answer": (
        [
            {"role": "user", "content": "Draw a yellow star."},
            {"role": "assistant", "content": "Here it is: <image_gen>\nA yellow star."},
        ],
        [
            (RELEASE_SYSTEM, USER),
            ("USER: Draw a yellow star. ASSISTANT:", USER),
            (f"Here it is: {GEN}\nA yellow star.", ANSWER),
        ],
    ),
    "gen_at_end_of_answer": (
        [
            {"role": "user", "content": "Draw a red circle."},
            {"role": "assistant", "content": "Here is a red circle. <image_gen>"},
        ],
        [
            (RELEASE_SYSTEM, USER),
            ("USER: Draw a red circle. ASSISTANT:", USER),
            (f"Here is a red circle. {GEN}", ANSWER),
        ],
    ),
}


def test_llama_style_tokenizer_keeps_whitespace_around_added_tokens():
    """The test tokenizer behaves like Llama's: a lone ▁ before an added token and <0x0A> for a newline."""
    tokenizer = llama_style_tokenizer()
    ids = tokenizer("USER: <image>\nWhat", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁USER:", "▁", "<image>", "▁", "<0x0A>", "What"]
    assert tokenizer("What")["input_ids"][0] == tokenizer.bos_token_id  # BOS only with add_special_tokens
    added = ["<image>", "<pad>", "<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>"]
    assert tokenizer.convert_tokens_to_ids(added) == list(range(len(tokenizer) - 5, len(tokenizer)))


def test_llama_style_tokenizer_saved_and_loaded_is_the_same(tmp_path):
    text = "USER: <image>\nWhat is it? ASSISTANT: Here it is.<|image_gen_start|>"
    loaded = llama_style_tokenizer(tmp_path)
    assert loaded(text)["input_ids"] == llama_style_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize("case", RELEASE_CASES)
def test_ids_and_labels_equal_the_releases_encoding(case):
    messages, elements = RELEASE_CASES[case]
    out = llama_tok(messages)
    expected_ids, expected_labels = release_encoding(elements)
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert not out.truncated


def test_whitespace_next_to_a_placeholder_is_kept():
    """The release's ids hold a ▁ before the image block and a newline after it (split-and-strip drops both)."""
    tokenizer = llama_style_tokenizer()
    out = llama_tok(RELEASE_CASES["image_at_start"][0])
    tokens = tokenizer.convert_ids_to_tokens(out.input_ids)
    start = tokens.index("<image>")
    assert tokens[start - 2 : start] == ["▁USER:", "▁"]
    assert tokens[start + LLAMA_IMAGE_TOKENS : start + LLAMA_IMAGE_TOKENS + 2] == ["▁", "<0x0A>"]


def test_inference_prompt_equals_the_releases_prompt_elements():
    """add_generation_prompt: the same elements up to the last ``USER: ... ASSISTANT:``, no answer, no BOS."""
    messages, elements = RELEASE_CASES["multi_turn_with_system_turn"]
    out = llama_tok(messages[:-1], add_generation_prompt=True)
    expected_ids, expected_labels = release_encoding(elements[:-1])
    assert out.input_ids == expected_ids and out.labels == expected_labels
    assert llama_style_tokenizer().bos_token_id not in out.input_ids
    assert (out.num_images, out.image_kinds) == (3, ["image"] * 3)


def test_label_masks_by_token_kind():
    """System and user ids, image tokens and gen pads are -100; answer text, gen start/end and </s> trained."""
    tokenizer = llama_style_tokenizer()
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    out = llama_tok(RELEASE_CASES["gen_inside_answer"][0])
    user_end = len(release_encoding(RELEASE_CASES["gen_inside_answer"][1][:2])[0])
    assert out.labels[:user_end] == [IGNORE_INDEX] * user_end
    answer = list(zip(out.input_ids[user_end:], out.labels[user_end:], strict=True))
    assert all(label == (IGNORE_INDEX if t == ids.gen_pad else t) for t, label in answer)
    assert out.input_ids.count(ids.gen_pad) == LLAMA_GEN_TOKENS and out.labels[-1] == ids.eos
    image_case = llama_tok(RELEASE_CASES["image_at_start"][0])
    assert {label for t, label in zip(image_case.input_ids, image_case.labels, strict=True) if t == ids.image} == {
        IGNORE_INDEX
    }


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
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image_gen><|image_gen_end|>"}],
            "malformed_conversation",
        ),
    ],
)
def test_invalid_conversations_raise_with_reason(messages, reason):
    with pytest.raises(InvalidSampleError) as info:
        tok(messages)
    assert info.value.reason == reason


def test_ids_that_are_not_the_tokenizers_special_tokens_are_refused():
    """Blocks are found back in the ids; ids that do not match the tokenizer would misalign images, so raise."""
    tokenizer = llama_style_tokenizer()
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    wrong = dataclasses.replace(ids, image=tokenizer.convert_tokens_to_ids("▁USER:"))  # an ordinary word
    messages = RELEASE_CASES["image_at_start"][0]
    with pytest.raises(InvalidSampleError) as info:
        tokenize_conversation(messages, tokenizer, wrong, LLAMA_IMAGE_TOKENS, LLAMA_GEN_TOKENS)
    assert info.value.reason == "malformed_conversation"


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
    from vargpt import tokens
    from vargpt.data import records

    assert (records.IMAGE_PLACEHOLDER, records.IMAGE_GEN_PLACEHOLDER) == (
        tokens.IMAGE_PLACEHOLDER,
        tokens.IMAGE_GEN_PLACEHOLDER,
    )
