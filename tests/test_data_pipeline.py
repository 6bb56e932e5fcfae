"""Streaming, mixing, splitting, collating and resuming (vargpt.data.pipeline, collate, datamodule)."""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures.data import (
    TASK_SOURCES,
    TINY_MODEL,
    tiny_world,
    world_tokenizer,
)
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from torch.utils.data import DataLoader

from vargpt.data.collate import Collator, Example
from vargpt.data.config import DataConfig, SourceConfig, check_data_config
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.pipeline import EvalStream, group_by_length
from vargpt.data.records import NON_UTF8, InvalidSampleError
from vargpt.data.shapes import render_scene
from vargpt.data.shards import (
    FORMAT,
    MANIFEST_NAME,
    ShardWriter,
    iter_raw_samples,
    parse_record,
    shard_list,
    write_json_atomic,
)
from vargpt.data.stream_sources import BadSourceError, SkipCounter, StreamCounts, check_bad_rate, load_sources
from vargpt.data.transforms import var_transform
from vargpt.model.config import load_model_config, register_resolvers
from vargpt.tokens import SpecialTokenIds

REPO = Path(__file__).resolve().parents[1]


def sources(split: str, weights: dict[str, float | None] | None = None) -> dict[str, SourceConfig]:
    weights = weights or dict.fromkeys(TASK_SOURCES)
    return {task: SourceConfig(f"{split}/{task}", w) for task, w in weights.items()}


def make_dm(**overrides) -> VARGPTDataModule:
    settings = {
        "root": str(tiny_world()),
        "train_sources": sources("train"),
        "val_sources": sources("val"),
        "micro_batch_size": 4,
        "num_workers": 0,
        "samples_per_epoch": 64,
        "shuffle_buffer": 50,
        "shuffle_initial": 10,
        "cutoff_len": 512,
    } | overrides
    dm = VARGPTDataModule.from_config(DataConfig(**settings), TINY_MODEL, world_tokenizer())
    dm.setup("fit")
    return dm


def ids_of(batch) -> tuple[str, ...]:
    return tuple(m["id"] for m in batch["meta"])


def check_batch_contract(batch, dm: VARGPTDataModule) -> None:
    ids = SpecialTokenIds.from_tokenizer(dm.tokenizer)
    model = dm.model
    x, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert x.dtype == mask.dtype == labels.dtype == torch.long and x.shape == mask.shape == labels.shape
    assert x.shape[1] % 8 == 0
    assert torch.all(x[mask == 0] == ids.pad) and torch.all(labels[mask == 0] == -100)
    # Padding is on the right: each row is ones then zeros.
    assert torch.all(mask[:, :-1] >= mask[:, 1:])
    n_und = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[0]
    n_gen = 0 if batch["pixel_gen_values"] is None else batch["pixel_gen_values"].shape[0]
    assert (x == ids.image).sum() == n_und * model.num_image_tokens
    assert (x == ids.gen_start).sum() == (x == ids.gen_end).sum() == n_gen
    assert (x == ids.gen_pad).sum() == n_gen * model.num_gen_tokens
    assert torch.all(labels[(x == ids.gen_pad) | (x == ids.image)] == -100)
    if n_und:
        assert batch["pixel_values"].shape[1:] == (3, model.image_size, model.image_size)
    if n_gen:
        gen = batch["pixel_gen_values"]
        assert gen.shape[1:] == (3, model.gen_image_size, model.gen_image_size) and gen.min() >= -1 and gen.max() <= 1
    assert len(batch["meta"]) == x.shape[0]


def test_collate_orders_images_row_major_then_in_sequence():
    def img(v: float) -> torch.Tensor:
        return torch.full((3, 2, 2), v)

    a = Example(torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]), [img(1), img(2)], [img(10)], {"id": "a"})
    b = Example(torch.tensor([8]), torch.tensor([8]), [img(3)], [img(11)], {"id": "b"})
    batch = Collator(pad_id=0, pad_to_multiple_of=8)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"][0, :4].tolist() == [-100, 6, 7, -100]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 3]
    assert batch["pixel_gen_values"][:, 0, 0, 0].tolist() == [10, 11]
    none = Collator(0)([Example(torch.tensor([1]), torch.tensor([1]))])
    assert none["pixel_values"] is None and none["pixel_gen_values"] is None


def test_train_batches_honour_the_contract_and_carry_their_position():
    dm = make_dm()
    for batch in dm.train_dataloader():
        assert set(batch["_stream"]) == {"split", "epoch", "worker", "cursor", "batches", "counts"}
        batch = dm.on_before_batch_transfer(batch, 0)
        assert "_stream" not in batch
        check_batch_contract(batch, dm)
    assert {m["source"] for m in batch["meta"]} <= set(TASK_SOURCES)


def test_generation_targets_line_up_with_their_samples():
    """End to end: each pixel_gen_values entry is the rendered ground truth of its own sample."""
    dm = make_dm(val_sources={"t2i": SourceConfig("val/t2i")})
    transform = var_transform(64, train=False)
    for batch in dm.val_dataloader():
        check_batch_contract(batch, dm)
        expected = torch.stack([transform(render_scene(m["attributes"][0], 64)) for m in batch["meta"]])
        assert torch.equal(batch["pixel_gen_values"], expected)


def test_mixture_follows_the_weights():
    dm = make_dm(train_sources=sources("train", {"caption": 1.0, "vqa": 2.0, "t2i": 3.0, "mixed": 0.0}))
    stream = dm.train_stream
    assert stream is not None
    # The mixture is drawn on raw samples (decoding comes later): count a few thousand draws.
    raw = stream._raw_stream(worker=0, skips=SkipCounter("test", 60.0))
    counts = Counter(name for name, _ in itertools.islice(raw, 6000))
    assert "mixed" not in counts
    for name, share in (("caption", 1 / 6), ("vqa", 2 / 6), ("t2i", 3 / 6)):
        assert abs(counts[name] / 6000 - share) < 0.02, counts
    batch_sources = {m["source"] for batch in dm.train_dataloader() for m in batch["meta"]}
    assert batch_sources == {"caption", "vqa", "t2i"}
    # Null weights = proportional to size, like concatenating the sources.
    loaded = load_sources(sources("train"), tiny_world())
    assert [s.weight for s in loaded] == [s.num_samples for s in loaded]


@pytest.mark.parametrize("val", [sources("val"), {"vqa": SourceConfig("val/vqa")}], ids=["by-shard", "by-sample"])
def test_eval_streams_of_two_ranks_and_two_workers_are_disjoint_and_complete(val):
    loaded = load_sources(val, tiny_world())
    expected = sorted(
        json.loads(raw["json"])["id"] for s in loaded for raw in iter_raw_samples([p for p, _ in s.shards])
    )
    dm = make_dm(val_sources=val)
    assert dm.val_stream is not None
    seen: list[str] = []
    for rank in (0, 1):
        stream = EvalStream(loaded, dm.val_stream.processor, dm.val_stream.collator, 5, rank=rank, world_size=2)
        per_rank = [i for batch in DataLoader(stream, batch_size=None, num_workers=2) for i in ids_of(batch)]
        assert per_rank  # both ranks get work
        seen += per_rank
    assert sorted(seen) == expected  # nothing twice, nothing dropped


def test_fixed_epoch_length_and_seeded_streams():
    dm = make_dm(num_workers=2, samples_per_epoch=40)
    loader = dm.train_dataloader()
    assert len(loader) == 10  # 40 samples / batch 4 = 10 batches = 5 per worker
    epoch0 = [ids_of(b) for b in loader]
    epoch1 = [ids_of(b) for b in loader]
    assert len(epoch0) == len(epoch1) == 10 and epoch0 != epoch1
    again = make_dm(num_workers=2, samples_per_epoch=40)
    assert [ids_of(b) for b in again.train_dataloader()] == epoch0  # same seed, same stream
    other_seed = make_dm(num_workers=2, samples_per_epoch=40, seed=1)
    assert [ids_of(b) for b in other_seed.train_dataloader()] != epoch0


def test_ranks_draw_different_streams():
    dm = make_dm()
    stream = dm.train_stream
    assert stream is not None
    first = [ids_of(b) for b in stream]
    stream.rank, stream.world_size = 1, 2
    second = [ids_of(b) for b in stream]
    assert len(second) == len(first) // 2 and second != first[: len(second)]


def consume(dm: VARGPTDataModule, limit: int | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """(worker, ids) of the training batches the 'loop' takes, through the position hook."""
    out = []
    for batch in dm.train_dataloader():
        worker = batch["_stream"]["worker"]
        out.append((worker, ids_of(dm.on_before_batch_transfer(batch, 0))))
        if limit is not None and len(out) == limit:
            break
    return out


def reload(state: dict) -> dict:
    """A state through torch.save / torch.load(weights_only=True), as a checkpoint carries it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(workers):
    full = consume(make_dm(num_workers=workers))
    assert len(full) == 16
    first = make_dm(num_workers=workers)
    taken = consume(first, limit=5)
    assert taken == full[:5]
    resumed = make_dm(num_workers=workers)
    resumed.load_state_dict(reload(first.state_dict()))
    rest = consume(resumed)
    # Each worker continues its own sequence exactly; workers restart their round-robin at worker 0.
    for w in range(max(workers, 1)):
        assert [b for x, b in rest if x == w] == [b for x, b in full[5:] if x == w]
    assert len(rest) == 11
    assert [ids_of(b) for b in resumed.train_dataloader()] != [b for _, b in full]  # then the next epoch


def test_resume_with_other_workers_is_approximate_but_keeps_the_epoch_length():
    first = make_dm(num_workers=2)
    consume(first, limit=6)
    other = make_dm(num_workers=0)
    other.load_state_dict(reload(first.state_dict()))
    assert len(consume(other)) == 16 - 6


def test_resume_through_a_lightning_checkpoint(tmp_path):
    """The real hooks: Lightning saves the data module's state mid-epoch and restores it on resume."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[str, ...]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(ids_of(batch))
            return (self.weight * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(ckpt: str | None = None) -> Recorder:
        model = Recorder()
        trainer = pl.Trainer(
            max_steps=10,
            accelerator="cpu",
            logger=False,
            callbacks=[pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1)],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=make_dm(), ckpt_path=ckpt)
        return model

    uninterrupted = fit()
    # The checkpoint written after step 4, mid-epoch (16 batches per epoch), as a crashed run leaves it.
    tail = fit(str(tmp_path / "epoch=0-step=4.ckpt"))
    assert len(uninterrupted.seen) == 10 and tail.seen == uninterrupted.seen[4:]


def test_truncated_samples_keep_whole_blocks_and_are_counted():
    dm = make_dm(train_sources=sources("train", {"t2i": 1.0, "mixed": 1.0}), cutoff_len=96, samples_per_epoch=48)
    truncated = 0
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        check_batch_contract(batch, dm)
        assert batch["input_ids"].shape[1] <= 96
        truncated += sum(m["truncated"] for m in batch["meta"])
    assert truncated > 0  # generation blocks do not fit in 96 tokens: cut before them, never inside


def test_unreadable_shards_are_counted_not_fatal(tmp_path):
    source = tmp_path / "vqa"
    shutil.copytree(tiny_world() / "train" / "vqa", source)
    (source / "broken.tar").write_bytes(b"\x00garbage" * 300)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["shards"].append({"name": "broken.tar", "num_samples": 1000, "sha256": "", "size_bytes": 2400})
    (source / "manifest.json").write_text(json.dumps(manifest))
    assert len(shard_list(source)) == len(manifest["shards"])
    dm = make_dm(train_sources={"vqa": SourceConfig(str(source))}, samples_per_epoch=32)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8 and batches[-1]["_stream"]["counts"]["skipped"]["vqa"]["read_error"] > 0
    dm.on_before_batch_transfer(batches[-1], 0)
    assert dm.local_counts("train").skipped["vqa"]["read_error"] > 0


def test_data_configs_validate_and_the_default_builds_its_world(tmp_path):
    register_resolvers()  # conf/model/tiny.yaml names the checkout with ${vargpt_repo:}
    schema = OmegaConf.structured(DataConfig)
    for path in sorted((REPO / "conf" / "data").glob("*.yaml")):
        OmegaConf.merge(schema, OmegaConf.load(path))
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"micro_batch_sise": 3})
    root = OmegaConf.create(
        {"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(REPO / "conf/data/shapes.yaml")}
    )
    data = root.data
    data.shapes.train, data.shapes.val, data.shapes.num_workers = 40, 16, 1
    data.num_workers, data.micro_batch_size, data.samples_per_epoch = 0, 4, 8
    dm = VARGPTDataModule.from_config(data, load_model_config(REPO / "conf/model/tiny.yaml"))
    dm.prepare_data()
    assert (tmp_path / "shapes" / "manifest.json").is_file()
    dm.setup("fit")
    check_batch_contract(dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0), dm)
    check_batch_contract(next(iter(dm.val_dataloader())), dm)


def _ddp_rank(rank: int, world: str, out: str, port: int) -> None:
    """One of two gloo ranks: take 3 batches, then dump the data module's state (gathered over the ranks)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = DataConfig(root=world, train_sources=sources("train"), micro_batch_size=4, num_workers=0)
        dm = VARGPTDataModule.from_config(replace(cfg, samples_per_epoch=64), TINY_MODEL, world_tokenizer())
        dm.setup("fit")
        consume(dm, limit=3)
        state = dm.state_dict()  # a collective: every rank calls it, as Lightning's checkpointing does
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes import the whole stack: ~30 s on 2 cores
def test_state_gathers_every_rank_and_resumes_rank_1_exactly(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(str(tiny_world()), str(tmp_path), port), nprocs=2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state["positions"]) == {0, 1} and state["world_size"] == 2
    assert sum(state["counts"]["seen"].values()) == 2 * 3 * 4  # both ranks' 3 batches of 4, none skipped

    def rank1() -> VARGPTDataModule:
        dm = make_dm()
        assert dm.train_stream is not None
        dm.train_stream.rank, dm.train_stream.world_size = 1, 2
        return dm

    full = consume(rank1())
    resumed = rank1()
    resumed.load_state_dict(state)
    assert consume(resumed) == full[3:] and len(full) == 8


# ------------------------------------------------------------------------------------------- length grouping
def padding_fraction(batches) -> float:
    mask = [b["attention_mask"] for b in batches]
    return 1 - sum(float(m.sum()) for m in mask) / sum(m.numel() for m in mask)


def test_group_by_length_cuts_sorted_single_modality_batches_and_carries_the_last_read():
    import random

    def ex(length: int, gen: bool) -> Example:
        return Example(torch.zeros(length, dtype=torch.long), torch.zeros(length), [], [torch.zeros(1)] if gen else [])

    lengths = [30, 5, 12, 40, 7, 22, 9, 31, 18, 3, 25, 11, 6]
    pool = [(i, ex(n, gen=i % 3 == 0)) for i, n in enumerate(lengths)]  # 5 generation, 8 understanding
    batches, leftover = group_by_length(pool, 3, by_modality=True, rng=random.Random(0))
    # Understanding: 8 -> 2 batches + the 2 last read; generation: 5 -> 1 batch + the 2 last read.
    und = [i for i, e in pool if not e.is_generation]
    gen = [i for i, e in pool if e.is_generation]
    assert [i for i, _ in leftover] == sorted(und[-(len(und) % 3) :] + gen[-(len(gen) % 3) :])
    assert len(batches) == 3 and all(len(b) == 3 for b in batches)
    for b in batches:
        assert len({e.is_generation for _, e in b}) == 1  # one modality per batch
        assert [len(e.input_ids) for _, e in b] == sorted((len(e.input_ids) for _, e in b), reverse=True)
    served = sorted(i for b in batches for i, _ in b) + [i for i, _ in leftover]
    assert sorted(served) == list(range(len(pool)))  # every sample once
    # Without modalities: one group, sorted across kinds, and a seeded order.
    mixed, rest = group_by_length(pool[:12], 3, by_modality=False, rng=random.Random(0))
    assert rest == [] and sorted(len(e.input_ids) for _, e in mixed[0]) == [len(e.input_ids) for _, e in mixed[0]][::-1]
    again, _ = group_by_length(pool[:12], 3, by_modality=False, rng=random.Random(0))
    assert [[i for i, _ in b] for b in again] == [[i for i, _ in b] for b in mixed]


def test_length_grouped_stream_pads_less_and_keeps_modalities_apart():
    plain = list(make_dm().train_dataloader())
    grouped_dm = make_dm(group_by="modality_length", group_batches=4)
    grouped = list(grouped_dm.train_dataloader())
    assert len(grouped) == len(plain) == 16
    for batch in grouped:
        pools = {"start", "carry", "end", "emitted"}
        assert set(batch["_stream"]) == {"split", "epoch", "worker", "cursor", "batches", "counts"} | pools
        batch = grouped_dm.on_before_batch_transfer(batch, 0)
        check_batch_contract(batch, grouped_dm)
        gen_rows = (batch["input_ids"] == SpecialTokenIds.from_tokenizer(grouped_dm.tokenizer).gen_start).any(1)
        assert gen_rows.all() or not gen_rows.any()
    assert padding_fraction(grouped) < 0.5 * padding_fraction(plain)
    by_length = list(make_dm(group_by="length", group_batches=4).train_dataloader())
    assert padding_fraction(by_length) < padding_fraction(plain)
    with pytest.raises(ValueError, match="group_batches"):
        make_dm(group_by="length", group_batches=1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [3, 8])  # (0 workers) after a pool's last batch; mid-pool with carried samples
def test_length_grouped_resume_continues_the_stream_exactly(workers, cut):
    settings = {"num_workers": workers, "group_by": "modality_length", "group_batches": 4}
    full = consume(make_dm(**settings))
    assert len(full) == 16
    first = make_dm(**settings)
    assert consume(first, limit=cut) == full[:cut]
    state = reload(first.state_dict())
    assert state["grouping"] == "modality_length:4"
    resumed = make_dm(**settings)
    resumed.load_state_dict(state)
    rest = consume(resumed)
    for w in range(max(workers, 1)):
        assert [b for x, b in rest if x == w] == [b for x, b in full[cut:] if x == w]
    assert len(rest) == 16 - cut
    # Other grouping settings: an approximate resume that keeps the epoch's length.
    other = make_dm(num_workers=workers, group_by="length", group_batches=4)
    other.load_state_dict(state)
    assert len(consume(other)) == 16 - cut


def test_length_grouped_ranks_draw_their_own_streams():
    dm = make_dm(group_by="length", group_batches=2)
    stream = dm.train_stream
    assert stream is not None
    first = [ids_of(b) for b in stream]
    stream.rank, stream.world_size = 1, 2
    second = [ids_of(b) for b in stream]
    assert len(second) == len(first) // 2 and second != first[: len(second)]


# ------------------------------------------------------------------------------------------- data health
def corrupt_copy(source: Path, out: Path, every: int, shard_samples: int) -> tuple[int, int]:
    """Re-write a source into ``out`` with every ``every``-th record made invalid UTF-8; (samples, corrupted)."""
    out.mkdir()
    writer = ShardWriter(out, "shard", max_bytes=1 << 30, max_samples=shard_samples)
    n = bad = 0
    for raw in iter_raw_samples([p for p, _ in shard_list(source)]):
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        if n % every == 0:
            members["json"] = members["json"].replace(b'"messages"', b'"m\xffessages"', 1)
            bad += 1
        writer.write(raw["__key__"], members)
        n += 1
    shards = [s.to_dict() for s in writer.close()]
    write_json_atomic(out / MANIFEST_NAME, {"format": FORMAT, "source": out.name, "num_samples": n, "shards": shards})
    return n, bad


def test_bad_utf8_in_a_shard_record_is_non_utf8_as_in_the_converters():
    raw = {"__key__": "k", "json": b'{"id": "caf\xe9", "messages": [], "images": []}'}
    with pytest.raises(InvalidSampleError) as caught:
        parse_record(raw)
    assert caught.value.reason == NON_UTF8 == "non_utf8"


@pytest.mark.parametrize("shard_samples", [8, 100], ids=["by-shard", "by-sample"])
def test_eval_counts_are_per_source_and_summed_exactly_over_workers(tmp_path, shard_samples):
    n, bad = corrupt_copy(tiny_world() / "val" / "vqa", tmp_path / "vqa", every=4, shard_samples=shard_samples)
    dm = make_dm(val_sources={"vqa": SourceConfig(str(tmp_path / "vqa")), "t2i": SourceConfig("val/t2i")})
    dm = make_dm(val_sources=dm.cfg.val_sources, num_workers=2)
    t2i = dm.val_stream.sources[1].num_samples
    for _ in range(2):  # a second pass counts afresh, not on top of the first
        served = sum(len(dm.on_before_batch_transfer(b, 0)["meta"]) for b in dm.val_dataloader())
        assert served == n - bad + t2i
        counts = dm.run_counts("val")
        assert counts == StreamCounts({"vqa": n, "t2i": t2i}, {"vqa": {"non_utf8": bad}})
    assert dm.local_counts("train") == StreamCounts()


@pytest.mark.parametrize("workers", [0, 2])
def test_training_counts_add_up_over_epochs_and_survive_a_resume(tmp_path, workers):
    corrupt_copy(tiny_world() / "train" / "vqa", tmp_path / "vqa", every=5, shard_samples=50)
    train = {"vqa": SourceConfig(str(tmp_path / "vqa")), "caption": SourceConfig("train/caption")}

    def data() -> VARGPTDataModule:
        return make_dm(train_sources=train, num_workers=workers, bad_sample_min_samples=10**6)

    full = data()
    consume(full)
    one_epoch = full.run_counts("train")
    assert one_epoch.skipped["vqa"]["non_utf8"] > 0 and "caption" not in one_epoch.skipped
    assert sum(one_epoch.seen.values()) - sum(map(one_epoch.bad, one_epoch.seen)) == 64  # the samples served
    consume(full)  # the next epoch adds to the first
    assert full.run_counts("train").seen["vqa"] > one_epoch.seen["vqa"]

    first = data()
    consume(first, limit=5)
    state = reload(first.state_dict())
    assert state["counts"] == first.run_counts("train").to_dict()
    resumed = data()
    resumed.load_state_dict(state)
    consume(resumed)
    # In stream order a resume skips the samples already read unopened: the run's count is the uninterrupted one.
    assert resumed.run_counts("train") == one_epoch


def test_a_source_over_the_bad_sample_rate_stops_the_run_naming_it(tmp_path):
    corrupt_copy(tiny_world() / "train" / "vqa", tmp_path / "vqa", every=4, shard_samples=50)
    train = {"vqa": SourceConfig(str(tmp_path / "vqa"))}
    with pytest.raises(BadSourceError) as caught:
        consume(make_dm(train_sources=train, max_bad_sample_rate=0.1, bad_sample_min_samples=20))
    message = str(caught.value)
    assert message.startswith("train source vqa: ") and "over data.max_bad_sample_rate=0.1" in message
    assert "non_utf8" in message and "data_prep/verify_shards.py" in message
    # Under the threshold, or before enough samples were seen: counted, not fatal.
    assert len(consume(make_dm(train_sources=train, max_bad_sample_rate=0.5, bad_sample_min_samples=20))) == 16
    assert len(consume(make_dm(train_sources=train, max_bad_sample_rate=0.1))) == 16  # default: 1000 samples


def test_the_rate_is_checked_once_a_source_gave_enough_samples():
    counts = StreamCounts({"a": 3, "b": 200}, {"a": {"image_unreadable": 1}, "b": {"too_long": 1}})
    check_bad_rate(counts, "train", max_rate=0.01, min_samples=10)  # a: 1 of 3 is too few to judge; b: 0.5 %
    counts.seen["a"] = 10
    with pytest.raises(BadSourceError, match=r"train source a: 1 of its 10 samples read were skipped \(10.0%"):
        check_bad_rate(counts, "train", max_rate=0.01, min_samples=10)
    with pytest.raises(BadSourceError, match="train source b: .* raise data.cutoff_len"):
        check_bad_rate(counts, "train", max_rate=0.001, min_samples=50)
    with pytest.raises(ValueError, match=r"data.max_bad_sample_rate must be in \[0, 1\]"):
        make_dm(max_bad_sample_rate=1.5)
    with pytest.raises(ValueError, match="data.bad_sample_min_samples must be >= 1, got 0"):
        check_data_config(OmegaConf.structured(DataConfig(bad_sample_min_samples=0)))  # as composed


def test_a_missing_listed_shard_is_an_error_unless_allowed(tmp_path, caplog):
    source = tmp_path / "vqa"
    shutil.copytree(tiny_world() / "train" / "vqa", source)
    shards = shard_list(source)
    assert len(shards) == 2
    Path(shards[1][0]).unlink()
    train = {"vqa": SourceConfig(str(source))}
    with pytest.raises(FileNotFoundError) as caught:
        make_dm(train_sources=train)
    message = str(caught.value)
    assert message.startswith("data.train_sources.vqa: 1 of 2 shards listed in ") and Path(shards[1][0]).name in message
    assert "data.allow_missing_shards=true" in message
    dm = make_dm(train_sources=train, allow_missing_shards=True)
    assert "data.allow_missing_shards=true, streaming the shards present" in caplog.text
    assert dm.missing_shards() == {"train/vqa": [shards[1][0]]}
    assert len(consume(dm)) == 16
    Path(shards[0][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 2 shards .* data.train_sources.vqa.weight=0 to leave it out"):
        make_dm(train_sources=train, allow_missing_shards=True)


def test_a_source_without_samples_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    write_json_atomic(tmp_path / "empty" / MANIFEST_NAME, {"format": FORMAT, "num_samples": 0, "shards": []})
    with pytest.raises(ValueError, match="data.val_sources.empty: .* lists no sample: .*weight=0"):
        make_dm(val_sources={"empty": SourceConfig(str(tmp_path / "empty"))})


def test_a_read_error_counts_once_when_every_eval_slot_reads_every_shard(tmp_path):
    # Every third sample is bad: each of the 4 slots gets some (a slot with no good sample makes no batch to report).
    n, bad = corrupt_copy(tiny_world() / "val" / "vqa", tmp_path / "vqa", every=3, shard_samples=100)
    broken = tmp_path / "vqa" / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 300)
    once = SkipCounter("test", 60.0)
    assert list(iter_raw_samples([str(broken)], handler=once.handler("vqa"))) == []
    manifest = json.loads((tmp_path / "vqa" / MANIFEST_NAME).read_text())
    manifest["shards"].append({"name": "broken.tar", "num_samples": 1, "sha256": "", "size_bytes": 2400})
    write_json_atomic(tmp_path / "vqa" / MANIFEST_NAME, manifest)
    loaded = load_sources({"vqa": SourceConfig(str(tmp_path / "vqa"))}, tmp_path)
    dm = make_dm(val_sources={"t2i": SourceConfig("val/t2i")})
    assert dm.val_stream is not None
    total = StreamCounts()
    for rank in (0, 1):  # 2 shards < 2 ranks x 2 workers: samples are split round-robin, every slot reads all
        stream = EvalStream(loaded, dm.val_stream.processor, dm.val_stream.collator, 5, rank=rank, world_size=2)
        last = {
            b["_stream"]["worker"]: b["_stream"]["counts"] for b in DataLoader(stream, batch_size=None, num_workers=2)
        }
        total = total + StreamCounts.total(StreamCounts.from_dict(c) for c in last.values())
    errors = once.counts.skipped["vqa"]["read_error"]
    assert total == StreamCounts({"vqa": n + errors}, {"vqa": {"non_utf8": bad, "read_error": errors}})
