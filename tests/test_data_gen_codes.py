"""Precomputed VQ codes: data_prep's encoder (vargpt.inference.gen_codes), the loader serving them, the same loss."""

from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from fixtures.data import tiny_world, world_tokenizer
from safetensors.torch import load_file

from vargpt.checkpoint.io import MemorySource, write_safetensors
from vargpt.data.config import DataConfig, SourceConfig
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.data.shards import GEN_CODES, read_manifest, verify_source
from vargpt.inference.gen_codes import GenCodesConverter
from vargpt.model import build_vargpt, load_model_config
from vargpt.model.vqvae import vqvae_from_config
from vargpt.tokens import SpecialTokenIds

REPO = Path(__file__).resolve().parents[1]
MODEL_YAML = REPO / "conf" / "model" / "tiny.yaml"
# The tiny model's config: 32 px understanding images, a 64 px VQ-VAE with L = 130 (the test world is 64 px).
TINY = load_model_config(MODEL_YAML, ["tokenizer=null", "init_from=null"])


@functools.cache
def encoded(tmp: str) -> tuple[Path, Path]:
    """(VQ-VAE weights file, folder of encoded sources): the world's val t2i and mixed sources, pixels dropped,
    through data_prep/encode_gen_codes.py's command line."""
    torch.manual_seed(0)
    weights = Path(tmp) / "vqvae"
    write_safetensors(MemorySource(vqvae_from_config(TINY.vqvae).state_dict()), weights)
    spec = importlib.util.spec_from_file_location("encode_gen_codes", REPO / "data_prep" / "encode_gen_codes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for task in ("t2i", "mixed"):
        args = ["--input", str(tiny_world() / "val" / task), "--weights", str(weights / "model.safetensors")]
        args += ["--model-config", str(MODEL_YAML), "--drop-pixels", "--batch-size", "8"]
        assert script.main([*args, "--out", str(Path(tmp) / "codes" / task), "--shard-max-samples", "7"]) == 0
    return weights / "model.safetensors", Path(tmp) / "codes"


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> tuple[Path, Path]:
    return encoded(str(tmp_path_factory.mktemp("gen-codes")))


def data_module(root: Path, sources: dict[str, str], gen_codes: bool, **overrides) -> VARGPTDataModule:
    cfg = DataConfig(
        root=str(root),
        train_sources={name: SourceConfig(path) for name, path in sources.items()},
        val_sources={name: SourceConfig(path) for name, path in sources.items()},
        micro_batch_size=4,
        num_workers=0,
        samples_per_epoch=32,
        shuffle_buffer=20,
        shuffle_initial=5,
        cutoff_len=512,
        gen_codes=gen_codes,
        **overrides,
    )
    dm = VARGPTDataModule.from_config(cfg, TINY, world_tokenizer())
    dm.setup("fit")
    return dm


def test_encoder_writes_a_verified_resumable_source(codes_dir):
    _, root = codes_dir
    source = root / "t2i"
    manifest = read_manifest(source)
    original = read_manifest(tiny_world() / "val" / "t2i")
    assert manifest["num_samples"] == original["num_samples"] and manifest["num_skipped"] == 0
    block = manifest[GEN_CODES]
    assert block["patch_nums"] == list(TINY.vqvae.patch_nums) and block["num_tokens"] == 130
    assert block["pixels"] == "dropped" and len(block["vqvae_sha256"]) == 64 and block["transform"] == "var_eval"
    assert verify_source(source).ok, verify_source(source).problems
    # Idempotent: the same conversion again returns the finished manifest and rewrites nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in source.glob("*.tar")}
    converter = GenCodesConverter(tiny_world() / "val" / "t2i", str(codes_dir[0]), str(MODEL_YAML), True, 8)
    assert run_conversion(converter, ConvertOptions(source, shard_max_samples=7)) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in source.glob("*.tar")} == stamps
    # Other options (pixels kept) are another conversion: refused without overwrite.
    converter.drop_pixels = False
    with pytest.raises(FileExistsError):
        run_conversion(converter, ConvertOptions(source, shard_max_samples=7))


def test_loss_with_precomputed_codes_equals_pixels_encoded_on_the_fly(codes_dir):
    weights, root = codes_dir
    sources = {"mixed": "mixed"}  # generation and understanding images
    with_codes = data_module(root, sources, gen_codes=True)
    with_pixels = data_module(tiny_world() / "val", sources, gen_codes=False)
    model = build_vargpt(TINY, SpecialTokenIds.from_tokenizer(world_tokenizer())).eval()
    model.vae_local.load_state_dict(load_file(weights))
    pairs = zip(with_codes.val_dataloader(), with_pixels.val_dataloader(), strict=True)
    batches = list(itertools.islice(pairs, 2))  # two are enough (a CPU forward takes a second)
    assert batches[0][0]["pixel_values"] is not None and batches[0][0]["gen_codes"] is not None
    for codes_batch, pixel_batch in batches:  # evaluation order: the same samples, centre-cropped
        assert [m["id"] for m in codes_batch["meta"]] == [m["id"] for m in pixel_batch["meta"]]
        assert codes_batch["pixel_gen_values"] is None
        if pixel_batch["pixel_gen_values"] is None:  # a batch of mixed samples that only ask about an image
            assert codes_batch["gen_codes"] is None
        else:
            on_the_fly = torch.cat(model.vae_local.img_to_codes(pixel_batch["pixel_gen_values"]), dim=1)
            assert codes_batch["gen_codes"].dtype == torch.long and torch.equal(codes_batch["gen_codes"], on_the_fly)
        with torch.no_grad():
            torch.testing.assert_close(model(codes_batch).loss, model(pixel_batch).loss)


def test_training_stream_serves_codes_and_skips_samples_without_them(codes_dir):
    _, root = codes_dir
    # Length-grouped by modality: generation batches carry codes only.
    dm = data_module(root, {"t2i": "t2i", "mixed": "mixed"}, gen_codes=True, group_by="modality_length")
    batches = list(dm.train_dataloader())
    assert all(b["pixel_gen_values"] is None for b in batches)
    assert {b["gen_codes"].shape[1] for b in batches if b["gen_codes"] is not None} == {130}
    # A source without codes: its generation samples are skipped and counted, understanding ones still served.
    world = tiny_world() / "train"
    plain = data_module(world, {"t2i": "t2i", "caption": "caption"}, gen_codes=True)
    batches = list(plain.train_dataloader())
    assert len(batches) == 8 and batches[-1]["_stream"]["counts"]["skipped"]["t2i"]["codes_missing"] > 0
    assert all(b["gen_codes"] is None and b["pixel_gen_values"] is None for b in batches)
    # Codes of another VQ-VAE schedule are refused when the data module is set up.
    other = load_model_config(MODEL_YAML, ["tokenizer=null", "init_from=null"])
    other.vqvae.patch_nums = (1, 2, 4, 8)
    cfg = DataConfig(root=str(root), train_sources={"t2i": SourceConfig("t2i")}, gen_codes=True, num_workers=0)
    with pytest.raises(ValueError, match="re-encode"):
        VARGPTDataModule.from_config(cfg, other, world_tokenizer()).setup("fit")
    # So are codes of targets resized otherwise than data.gen_resize_ratio says (these were made at VAR's 1.125).
    assert read_manifest(root / "t2i")[GEN_CODES]["resize_ratio"] == 1.125
    cfg.gen_resize_ratio = 1.0
    with pytest.raises(ValueError, match="resize_ratio"):
        VARGPTDataModule.from_config(cfg, TINY, world_tokenizer()).setup("fit")
