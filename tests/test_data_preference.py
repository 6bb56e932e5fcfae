"""Preference pairs: the ranking-schema converter, pair records through the processor and the pair collator."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.data import NUM_GEN_TOKENS, NUM_IMAGE_TOKENS, TINY_MODEL, tiny_world, world_ids, world_tokenizer
from PIL import Image

from vargpt.data.chat import IGNORE_INDEX, tokenize_conversation
from vargpt.data.collate import Collator, Example, PairCollator, PairExample
from vargpt.data.config import DataConfig, SourceConfig
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.dataset_formats import PreferenceConverter
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.data.records import (
    IDENTICAL_PAIR,
    MALFORMED_PAIR,
    PLACEHOLDER_MISMATCH,
    InvalidSampleError,
    check_pair,
    normalize_messages,
)
from vargpt.data.shards import encode_codes, gen_image_names, iter_raw_samples, parse_sample, shard_list
from vargpt.data.stream_sources import VAL

FIXTURE = Path(__file__).parent / "fixtures" / "preference"
GOOD = ("t2i-red-circle", "vqa-green-square", "t2i-two-turns")


@functools.cache
def converted(tmp: str) -> Path:
    out = Path(tmp) / "pairs"
    run_conversion(PreferenceConverter(FIXTURE / "pairs.json", FIXTURE / "images", "pairs"), ConvertOptions(out))
    return out


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return converted(str(tmp_path_factory.mktemp("preference")))


def data_module(val: dict[str, str], **overrides) -> VARGPTDataModule:
    settings = {
        "root": str(tiny_world()),
        "val_sources": {name: SourceConfig(path) for name, path in val.items()},
        "micro_batch_size": 3,
        "num_workers": 0,
        "cutoff_len": 512,
        "gen_resize_ratio": 1.0,
        "pairs": True,
        "max_bad_sample_rate": 1.0,
    } | overrides
    dm = VARGPTDataModule.from_config(DataConfig(**settings), TINY_MODEL, world_tokenizer())
    dm.setup("fit")
    return dm


def raw_samples(source: Path) -> list[dict]:
    return list(iter_raw_samples([path for path, _ in shard_list(source)]))


def test_converter_counts_bad_pairs_by_reason_and_keeps_a_pair_as_one_sample(pairs_dir):
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    assert manifest["num_entries"] == 5 and manifest["num_samples"] == 3 and manifest["pairs"] is True
    assert manifest["skipped_by_reason"] == {IDENTICAL_PAIR: 1, MALFORMED_PAIR: 1}
    assert {e["id"] for e in manifest["skipped_examples"]} == {"bad-identical", "bad-prompt-ends-on-gpt"}
    records = {json.loads(raw["json"])["id"]: raw for raw in raw_samples(pairs_dir)}
    assert tuple(records) == GOOD
    vqa = json.loads(records["vqa-green-square"]["json"])
    assert vqa["messages"][0] == {"role": "system", "content": "You answer questions about shapes."}
    assert vqa["chosen"] == {"role": "assistant", "content": "A green square."} and vqa["images"] == ["img0.png"]
    red = records["t2i-red-circle"]
    record, images = parse_sample(red)
    # Images travel in placeholder order: chosen's, then rejected's.
    assert images == [(FIXTURE / "images" / n).read_bytes() for n in ("red_circle.png", "blue_circle.png")]
    assert gen_image_names(record) == ["img0.png", "img1.png"]
    conversation, _ = parse_sample(raw_samples(tiny_world() / "val" / "t2i")[0])
    assert gen_image_names(conversation) == conversation["images"] and len(conversation["images"]) == 1


def test_check_pair_reasons():
    prompt = normalize_messages([{"from": "human", "value": "Draw."}])
    gen = {"role": "assistant", "content": "<image_gen>"}
    assert check_pair(prompt, gen, {"role": "assistant", "content": "No."}, ["a"]).rows(["a"]) == (["a"], [])
    assistant_gen = [*prompt, gen, {"role": "user", "content": "Again."}]
    cases = [
        (IDENTICAL_PAIR, (prompt, gen, gen, [b"x", b"x"])),
        (PLACEHOLDER_MISMATCH, (prompt, gen, gen, [b"x"])),
        (MALFORMED_PAIR, (assistant_gen, gen, gen, [b"p", b"x", b"y"])),  # only responses generate
        (MALFORMED_PAIR, ([*prompt, gen], gen, gen, [b"p", b"x", b"y"])),  # the prompt awaits an answer
    ]
    for reason, args in cases:
        with pytest.raises(InvalidSampleError) as caught:
            check_pair(*args)
        assert caught.value.reason == reason


def centre_rgb(target_3RR: torch.Tensor) -> tuple[int, ...]:
    """The centre pixel of a generation target in [-1, 1], as 0..255 RGB."""
    R = target_3RR.shape[-1]
    return tuple(round((float(v) + 1) * 127.5) for v in target_3RR[:, R // 2, R // 2])


def png_rgb(name: str) -> tuple[int, ...]:
    with Image.open(FIXTURE / "images" / name) as img:
        return img.convert("RGB").getpixel((8, 8))


def test_pairs_collate_to_one_batch_of_chosen_then_rejected_rows(pairs_dir):
    dm = data_module({"pairs": str(pairs_dir)})
    (batch,) = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    ids, tok = world_ids(), world_tokenizer()
    x, labels = batch["input_ids"], batch["labels"]
    assert batch["pair_size"] == 3 and x.shape[0] == 6 and batch["ref_logps"] is None
    assert [(m["id"], m["pair"]) for m in batch["meta"]] == [(i, "chosen") for i in GOOD] + [
        (i, "rejected") for i in GOOD
    ]
    # Each row is the prompt plus its response tokenised as a conversation; labels mark the response only.
    for row, raw in zip(range(3), raw_samples(pairs_dir), strict=True):
        record, _ = parse_sample(raw)
        prompt = record["messages"]
        n_prompt = len(tokenize_conversation(prompt, tok, ids, NUM_IMAGE_TOKENS, NUM_GEN_TOKENS, None, True).input_ids)
        for r, side in ((row, "chosen"), (row + 3, "rejected")):
            full = tokenize_conversation([*prompt, record[side]], tok, ids, NUM_IMAGE_TOKENS, NUM_GEN_TOKENS)
            n = len(full.input_ids)
            assert x[r, :n].tolist() == full.input_ids and batch["attention_mask"][r].sum() == n
            assert labels[r, :n_prompt].eq(IGNORE_INDEX).all() and labels[r, n:].eq(IGNORE_INDEX).all()
            assert labels[r, n_prompt:n].tolist() == full.labels[n_prompt:]
    # The two-turn prompt's assistant turn is trained in a conversation, not in a pair row.
    assert any(label != IGNORE_INDEX for label in full.labels[:n_prompt])
    # The prompt's image goes to both rows of its pair; each response's image to its own row only.
    und = batch["pixel_values"]
    assert und.shape[0] == 2 and torch.equal(und[0], und[1])
    assert (x[1] == ids.image).sum() == (x[4] == ids.image).sum() == NUM_IMAGE_TOKENS
    gen = batch["pixel_gen_values"]
    expected = ["red_circle.png", "yellow_square.png", "blue_circle.png", "green_circle.png"]  # rows 0, 2, 3, 5
    assert (x == ids.gen_start).sum(1).tolist() == [1, 0, 1, 1, 0, 1] and gen.shape[0] == 4
    for target, name in zip(gen, expected, strict=True):
        assert np.abs(np.subtract(centre_rgb(target), png_rgb(name))).max() <= 8, name


def test_non_pairs_are_skipped_and_counted_in_each_mode(pairs_dir):
    pairs_and_t2i = data_module({"pairs": str(pairs_dir), "t2i": "val/t2i"})
    served = [m for b in pairs_and_t2i.val_dataloader() for m in pairs_and_t2i.on_before_batch_transfer(b, 0)["meta"]]
    assert {m["source"] for m in served} == {"pairs"} and len(served) == 6
    t2i = pairs_and_t2i.val_stream.sources[1].num_samples
    assert pairs_and_t2i.run_counts(VAL).skipped == {"t2i": {"not_a_pair": t2i}}
    conversations = data_module({"pairs": str(pairs_dir)}, pairs=False)
    assert list(conversations.val_dataloader()) == []  # every sample is a pair: skipped
    raw = raw_samples(pairs_dir)[0]
    with pytest.raises(InvalidSampleError, match="unexpected_pair"):
        conversations.val_stream.processor(raw, "pairs")
    # A pair is compared on whole responses: a cut row skips the pair (the two image pairs here; the text one fits).
    short = data_module({"pairs": str(pairs_dir)}, cutoff_len=100)
    assert [m["id"] for b in short.val_dataloader() for m in short.on_before_batch_transfer(b, 0)["meta"]] == [
        "vqa-green-square"
    ] * 2
    assert short.run_counts(VAL).skipped == {"pairs": {"too_long": 2}}


def with_codes(raw: dict, codes: list[np.ndarray], **fields) -> dict:
    """The raw pair with its generation images replaced by precomputed codes, and ``fields`` added to its record."""
    record = json.loads(raw["json"])
    names = gen_image_names(record)
    record["gen_codes"] = {name: f"c{i}.codes.npy" for i, name in enumerate(names)}
    out = {k: v for k, v in raw.items() if k not in names}
    out.update((f"c{i}.codes.npy", encode_codes(c)) for i, c in enumerate(codes))
    out["json"] = json.dumps(record | fields).encode()
    return out


def test_codes_path_and_ref_logps_order(pairs_dir):
    dm = data_module({"pairs": str(pairs_dir)}, gen_codes=True)
    process = dm.val_stream.processor
    raw = raw_samples(pairs_dir)[0]
    codes = [np.arange(NUM_GEN_TOKENS) % 7, np.arange(NUM_GEN_TOKENS) % 5]
    pair = process(with_codes(raw, codes, ref_logps={"chosen": -3.5, "rejected": -7.25}), "pairs")
    assert pair.ref_logps == (-3.5, -7.25) and not pair.chosen.pixel_gen_values
    assert [c.tolist() for c in pair.chosen.gen_codes + pair.rejected.gen_codes] == [c.tolist() for c in codes]
    other = process(with_codes(raw, codes[::-1], ref_logps={"chosen": -1.0, "rejected": -2.0}), "pairs")
    batch = dm.val_stream.collator([pair, other])
    assert batch["ref_logps"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [-3.5, -1.0, -7.25, -2.0]  # chosen_1, chosen_2, rejected_1, rejected_2
    # Rows chosen_1, chosen_2, rejected_1, rejected_2; the second pair has the codes swapped.
    assert [c.tolist() for c in batch["gen_codes"]] == [c.tolist() for c in (*codes, *codes[::-1])]
    no_ref = process(with_codes(raw, codes), "pairs")
    assert no_ref.ref_logps is None
    with pytest.raises(ValueError, match="mixes pairs with and without precomputed ref_logps"):
        dm.val_stream.collator([pair, no_ref])
    for bad, reason in (([codes[0], codes[0]], IDENTICAL_PAIR), (codes, MALFORMED_PAIR)):
        fields = {"ref_logps": {"chosen": "x"}} if reason == MALFORMED_PAIR else {}
        with pytest.raises(InvalidSampleError) as caught:
            process(with_codes(raw, bad, **fields), "pairs")
        assert caught.value.reason == reason


def test_pair_collator_rows_and_length():
    def ex(n: int, name: str) -> Example:
        return Example(torch.arange(n), torch.arange(n), meta={"id": name})

    pairs = [PairExample(ex(3, "a"), ex(5, "a")), PairExample(ex(2, "b"), ex(9, "b"))]
    assert [p.num_tokens for p in pairs] == [5, 9]
    batch = PairCollator(Collator(pad_id=0, pad_to_multiple_of=4))(pairs)
    assert batch["input_ids"].shape == (4, 12) and batch["attention_mask"].sum(1).tolist() == [3, 2, 5, 9]
    assert batch["pair_size"] == 2 and batch["ref_logps"] is None


def consume(dm: VARGPTDataModule, limit: int | None = None) -> list[tuple[str, ...]]:
    out = []
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert batch["pair_size"] == 2 and batch["input_ids"].shape[0] == 4
        out.append(tuple(f"{m['id']}/{m['pair']}" for m in batch["meta"]))
        if len(out) == limit:
            break
    return out


def test_length_grouped_pair_stream_resumes_exactly(pairs_dir):
    def make() -> VARGPTDataModule:
        train = {"train_sources": {"pairs": SourceConfig(str(pairs_dir))}, "micro_batch_size": 2}
        more = {"samples_per_epoch": 10, "group_by": "length", "group_batches": 2, "shuffle_initial": 2}
        return data_module({}, **train, **more)

    full = consume(make())
    assert len(full) == 5 and all(b[0].endswith("/chosen") and b[-1].endswith("/rejected") for b in full)
    first = make()
    assert consume(first, limit=2) == full[:2]
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert consume(resumed) == full[2:]
