"""The one evaluation core: the training callback and ``src/eval.py``'s runner make the same records, hence the
same figures, on the same model and items (the shapes world's questions and drawings, a benchmark's questions),
images drawn or not; and the no-image verdict is the one the judge would give every attribute it rates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_fixtures import write_benchmark
from llama_tokenizer import llama_style_tokenizer

from vargpt.eval import runner
from vargpt.eval.benchmarks import score
from vargpt.eval.callbacks import EvalCallback
from vargpt.eval.core import draw, no_image_verdict
from vargpt.eval.judge import ShapesJudge
from vargpt.eval.predictions import read_predictions
from vargpt.eval.shapes_eval import t2i_items
from vargpt.model import build_vargpt, load_model_config

CONF = Path(__file__).resolve().parents[1] / "conf"
N = 3  # items per part: not a multiple of the callback's 2 ranks, so one rank pads its share
SAMPLING = {"seed": 5}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), llama_style_tokenizer()).eval()


def two_ranks(callback: EvalCallback, model) -> list[dict]:
    """What two ranks' shares give the callback to gather (no lockstep)."""
    return [callback._local_results(model, rank, 2, lockstep=False) for rank in range(2)]


def gathered(parts: list[dict], part: str) -> list[dict]:
    """The records the callback scores, in the fixed list's order (padding repeats dropped)."""
    rows = sorted((row for share in parts for row in share[part] if row[0] >= 0), key=lambda row: row[0])
    return [row[1] for row in rows]


@pytest.mark.parametrize("force_image", [True, False], ids=["images", "no_image"])
def test_callback_and_runner_give_identical_shapes_records_and_figures(tmp_path, model, force_image):
    """Without an image the callback once zeroed only colour, shape and both (and recorded no reply_objects):
    its records now equal the runner's, whether the replies hold an image or not."""
    config = {"vqa": N, "t2i": N, "psnr": 0, "batch_size": 2, "vqa_max_new_tokens": 4, "t2i_max_new_tokens": 2,
              "force_image": force_image, "judge_validation": 50}  # fmt: skip
    scores = runner.run_shapes(model, tmp_path, config=config, batch_size=2, sampling=SAMPLING)
    callback = EvalCallback(num_images=N, vqa=N, batch_size=2, sampling=SAMPLING, max_new_tokens=2,
                            vqa_max_new_tokens=4, force_image=force_image, judge_validation=50)  # fmt: skip

    folder = tmp_path / "shapes"
    offline_t2i = [
        {k: v for k, v in r.items() if k != "image"} for r in read_predictions(folder / "t2i_predictions.jsonl")
    ]
    parts = two_ranks(callback, model)
    assert gathered(parts, "t2i") == offline_t2i
    assert gathered(parts, "vqa") == read_predictions(folder / "vqa_predictions.jsonl")
    assert scores["t2i/image_rate"] == (100.0 if force_image else 0.0)

    metrics, _ = callback._score(parts)
    assert metrics["eval/vqa_accuracy"] == scores["vqa/accuracy"]
    assert metrics["eval/image_rate"] == scores["t2i/image_rate"]
    for name in ("colour", "shape", "both"):
        assert metrics[f"eval/judge_{name}"] == scores[f"t2i/{name}"], name


def test_callback_and_runner_give_identical_benchmark_records_and_figures(tmp_path, model):
    write_benchmark("pope", tmp_path)
    scores = runner.run_benchmark(model, "pope", tmp_path, tmp_path / "out", batch_size=2, max_new_tokens=3)
    callback = EvalCallback(num_images=0, vqa=N, vqa_source="pope", data_root=str(tmp_path), batch_size=2,
                            vqa_max_new_tokens=3)  # fmt: skip

    offline = read_predictions(tmp_path / "out" / "pope" / "predictions.jsonl")[:N]
    parts = two_ranks(callback, model)
    assert gathered(parts, "vqa") == offline
    metrics, _ = callback._score(parts)
    limited = score("pope", offline)
    assert metrics["eval/vqa_accuracy"] == limited["adversarial/pope_accuracy"]
    assert {k: v for k, v in metrics.items() if k.startswith("eval/pope/")} == {
        f"eval/pope/{k}": v for k, v in limited.items() if k != "n"
    }
    assert scores["n"] >= N


def test_a_reply_without_an_image_gets_every_rated_attribute_wrong(model):
    """The one no-image verdict: colour, shape, both and count always, size / position / background when asked."""
    assert no_image_verdict(["colour", "shape"]) == {"colour": 0.0, "shape": 0.0, "both": 0.0, "count": 0.0}
    assert list(no_image_verdict(["background", "position", "size"])) == [
        "colour", "shape", "both", "count", "size", "position", "background"
    ]  # fmt: skip
    items = t2i_items(2)
    (batch,) = draw(model, items, {"max_new_tokens": 1}, 2, judge=ShapesJudge(64, n_validation=50))
    for item, (record, image) in zip(items, batch, strict=True):
        assert image is None and record["has_image"] == 0.0
        assert {k: record[k] for k in no_image_verdict(item.requested)} == no_image_verdict(item.requested)
        assert record["matched"] == [None] * len(item.scene["objects"])
