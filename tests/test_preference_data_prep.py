"""The preference data made by running a model: the self-improving loop's pairing and pair sources
(vargpt.preference.self_improve) and the precomputed reference log-probs (vargpt.preference.reference_logps)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.data.config import DataConfig, ModelInputs, SourceConfig
from vargpt.data.datamodule import VARGPTDataModule
from vargpt.data.datasets_to_shards import ConvertOptions, run_conversion
from vargpt.data.shards import iter_raw_samples, shard_list
from vargpt.eval.shapes_eval import t2i_items
from vargpt.preference.reference_logps import ReferenceLogpsConverter, load_reference
from vargpt.preference.self_improve import Candidate, PairWriter, pair_candidates, pair_record
from vargpt.training.preference_module import check_precomputed_reference, pair_logps

BACKBONES = Path(__file__).resolve().parents[1] / "backbones" / "shapes"


def candidate(rating_scores: dict[str, float], seed: int, codes: np.ndarray | None = None) -> Candidate:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed * 40 % 255, 90, 200)).save(buf, "PNG")
    codes = np.full(130, seed, dtype=np.int64) if codes is None else codes
    return Candidate(f"Here it is: <image_gen> ({seed})", codes, buf.getvalue(), rating_scores, seed)


def test_the_best_is_chosen_over_every_worse_one_or_the_worst():
    right = {"both": 1.0, "colour": 1.0, "shape": 1.0, "count": 1.0}
    half = {"both": 0.0, "colour": 1.0, "shape": 0.0, "count": 1.0}
    wrong = {"both": 0.0, "colour": 0.0, "shape": 0.0, "count": 0.0}
    a, b, c, d = candidate(half, 0), candidate(right, 1), candidate(wrong, 2), candidate(right, 3)
    assert [(x.seed, y.seed) for x, y in pair_candidates([a, b, c, d], "all")] == [(1, 0), (1, 2)]
    assert [(x.seed, y.seed) for x, y in pair_candidates([a, b, c, d], "worst")] == [(1, 2)]
    assert pair_candidates([b, d], "all") == []  # rated the same: no preference
    assert pair_candidates([a], "all") == []
    with pytest.raises(ValueError, match="all, worst"):
        pair_candidates([a, b], "best")


@pytest.fixture(scope="module")
def scored_source(tmp_path_factory) -> Path:
    """Two self-improve pairs (random codes of the tiny schedule), then their reference log-probs from the
    embedded backbones."""
    root = tmp_path_factory.mktemp("self_improve")
    items = t2i_items(2, split="train")
    rng = np.random.default_rng(0)
    pairs = []
    for i, item in enumerate(items):
        good = candidate({"both": 1.0}, 2 * i, rng.integers(0, 512, 130))
        bad = candidate({"both": 0.0}, 2 * i + 1, rng.integers(0, 512, 130))
        pairs.append(pair_record(item, good, bad))
    model = load_reference(str(BACKBONES), "cpu")
    codes = {"patch_nums": list(model.vae_local.schedule.patch_nums), "vocab_size": 512, "image_size": 64}
    info = {"request": {"ckpt": str(BACKBONES)}, **codes, "num_tokens": 130, "vqvae_sha256": "x"}
    run_conversion(PairWriter("loop", pairs, info), ConvertOptions(root / "pairs"))
    converter = ReferenceLogpsConverter(root / "pairs", str(BACKBONES), gen_codes=True, batch_size=1)
    run_conversion(converter, ConvertOptions(root / "pairs_ref"))
    return root


def test_precomputed_reference_logps_equal_the_reference_models(scored_source):
    manifest = json.loads((scored_source / "pairs_ref" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["reference"]["target"] == "image"
    assert manifest["gen_codes"]["resize_ratio"] == 1.0  # the pairs' own codes block is kept
    data = DataConfig(
        root=str(scored_source),
        pairs=True,
        pair_target="image",
        gen_codes=True,
        gen_resize_ratio=1.0,
        shapes=None,
        train_sources={},
        val_sources={"p": SourceConfig(path="pairs_ref")},
        micro_batch_size=2,
        num_workers=0,
    )
    model = load_reference(str(BACKBONES), "cpu")
    module = VARGPTDataModule(data, ModelInputs.of(model.cfg), model.tokenizer)
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    assert batch["pair_size"] == 2 and batch["ref_logps"].shape == (4,)
    with torch.no_grad():
        logps_B2, counts_B2 = pair_logps(model, batch, "image")
    # Scored one pair per call there, two here: padding changes the float sums in their last bits only.
    torch.testing.assert_close(batch["ref_logps"], logps_B2.T.reshape(-1), rtol=1e-6, atol=0)
    assert counts_B2.eq(130).all()
    # The pairs carry their sampled codes: the batch scores exactly them.
    raw = next(iter_raw_samples([shard_list(scored_source / "pairs_ref")[0][0]]))
    record = json.loads(raw["json"])
    assert set(record["ref_logps"]) == {"chosen", "rejected"} and record["chosen"]["content"].count("<image_gen>") == 1


def test_training_refuses_ref_logps_of_other_weights_or_settings(scored_source):
    model = load_reference(str(BACKBONES), "cpu")
    sources = {"p": scored_source / "pairs_ref"}
    settings = {"target": "image", "gen_codes": True, "gen_resize_ratio": 1.0}
    check_precomputed_reference(model, sources, settings)  # the scoring model and settings: accepted
    with pytest.raises(ValueError, match="target=image, this run has text"):
        check_precomputed_reference(model, sources, {**settings, "target": "text"})
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.vargpt_gen.head.bias.add_(1.0)
    with pytest.raises(ValueError, match="not by this stage's starting weights"):
        check_precomputed_reference(other, sources, settings)
