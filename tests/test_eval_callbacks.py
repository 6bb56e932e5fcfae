"""Evaluation callbacks inside a tiny training run (tiny model, a small shapes world, CPU, MLflow).

One run carries two evaluation callbacks: a working one (every optimizer step: image grid, judge, CLIP score
with a tiny local CLIP, VQA accuracy) and a broken one (its VQA source has no files). The run must finish, the
working callback's metrics and grids must be in MLflow, and the broken one's failure must be reported.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from eval_fixtures import write_benchmark
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from llama_tokenizer import llama_style_tokenizer
from omegaconf import open_dict
from PIL import Image

from vargpt.config import register_configs
from vargpt.data.shapes import ensure_shapes_world
from vargpt.eval import core
from vargpt.eval.benchmarks import get_benchmark
from vargpt.eval.callbacks import EvalCallback, image_grid
from vargpt.eval.core import BENCHMARK_QUESTIONS, EOSRecorder, answer, rank_share
from vargpt.model import build_vargpt, load_model_config
from vargpt.training.task import train
from vargpt.training.vargpt_app import APP as VARGPT_APP  # noqa: F401  (registers the VARGPT stages' app)

CONF = Path(__file__).resolve().parents[1] / "conf"
WORLD = {"train": 200, "val": 20}
CLIP_ARCH = "ViT-B-32"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(open_clip.create_model(CLIP_ARCH, **TINY_CLIP).state_dict(), path)
    return path


def compose_train(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_callbacks_in_a_training_run(tmp_path, clip_weights):
    from mlflow.tracking import MlflowClient

    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    ensure_shapes_world(data_dir / "shapes", size=64, seed=0, num_workers=1, **WORLD)
    cfg = compose_train(
        [
            "callbacks=eval",
            f"paths.log_dir={log_dir}",
            f"paths.data_dir={data_dir}",
            *(f"data.shapes.{k}={v}" for k, v in WORLD.items()),
            "data.num_workers=0",
            "data.micro_batch_size=2",
            "stage.global_batch_size=2",
            "stage.num_samples=4",  # 2 optimizer steps
            "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.export=none",
            "callbacks.extra.eval.every_n_steps=1",
            "callbacks.extra.eval.num_images=3",
            "callbacks.extra.eval.vqa=3",
            "callbacks.extra.eval.batch_size=4",
            "callbacks.extra.eval.max_new_tokens=1",
            "callbacks.extra.eval.force_image=true",
            "callbacks.extra.eval.vqa_max_new_tokens=3",
            "callbacks.extra.eval.judge_validation=50",
            f"callbacks.extra.eval.clip.weights={clip_weights}",
            f"callbacks.extra.eval.clip.model_cfg={TINY_CLIP}".replace("'", ""),
            # A broken evaluation: its VQA benchmark has no files. It must not stop training.
            "+callbacks.extra.broken={_target_:vargpt.eval.callbacks.EvalCallback,every_n_steps:2,num_images:0,"
            f"vqa:2,vqa_source:pope,data_root:{tmp_path / 'missing'}}}",
        ]
    )
    metrics = train(cfg)
    assert metrics["train/loss"] > 0  # the run finished

    client = MlflowClient(f"sqlite:///{log_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vargpt").experiment_id])
    assert run.info.status == "FINISHED"
    for name in ("eval/vqa_accuracy", "eval/judge_colour", "eval/judge_shape", "eval/judge_both",
                 "eval/image_rate", "eval/clip_score", "eval/clip_score_shuffled", "eval/seconds"):  # fmt: skip
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [1, 2], name  # every step; the end of training (step 2) is not evaluated twice
    assert 0 <= run.data.metrics["eval/clip_score"] <= 100
    assert run.data.metrics["eval/image_rate"] == 100.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/step_0000001.png", "eval/step_0000002.png", "eval/errors.txt"} <= artifacts
    grid = Image.open(Path(cfg.paths.run_dir) / "eval" / "step_0000002.png")
    assert grid.size == (3 * 128, 128 + 14)
    # The broken callback reported its failure (with the benchmark's own error) and training went on.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/failed")] == [2]
    errors = (Path(cfg.paths.run_dir) / "eval" / "errors.txt").read_text()
    assert "benchmark 'pope'" in errors and "Traceback" in errors


def test_image_grid_and_eos_recorder():
    images = [Image.new("RGB", (64, 64), "red"), None, Image.new("RGB", (32, 32), "blue")]
    grid = image_grid(images, ["red circle ok", "blue square", "x"], columns=2, tile=64)
    assert grid.size == (128, 2 * (64 + 14))
    assert grid.getpixel((10, 10)) == (255, 0, 0) and grid.getpixel((70, 10)) == (200, 200, 200)

    recorder = EOSRecorder(eos=2, n=3)
    logits = torch.tensor([[0.0, 1.0, 5.0], [9.0, 1.0, 0.0]])
    out = recorder([0, 2], [[7, 7], [7]], logits)
    assert recorder.ends == [2, None, None]
    assert out[0, 2] == float("-inf") and out[1, 2] == float("-inf") and logits[0, 2] == 5.0


def test_benchmark_questions_are_asked_as_src_eval_asks_them(tmp_path, monkeypatch):
    """The callback's benchmark VQA feeds the runner's prompts (lmms-eval's string with BOS) and takes the same
    answers, also in the FSDP lockstep path (fixed length, answers cut where the model would have ended)."""
    write_benchmark("pope", tmp_path)
    torch.manual_seed(0)
    model = build_vargpt(load_model_config(CONF / "model" / "tiny.yaml"), llama_style_tokenizer()).eval()
    fed: list[list[int]] = []
    original = core.generate

    def spy(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        fed.extend(out.prompt_ids for out in outputs)
        return outputs

    monkeypatch.setattr(core, "generate", spy)
    callback = EvalCallback(num_images=0, vqa=2, vqa_source="pope", data_root=str(tmp_path), vqa_max_new_tokens=3)
    items = callback._vqa_items()
    answers = {
        lockstep: [r["prediction"] for _, r in callback._answer(model, rank_share(items, 0, 1), lockstep)]
        for lockstep in (False, True)
    }
    callback_fed, fed[:] = list(fed), []
    sampling = get_benchmark("pope").sampling(max_new_tokens=3)
    records = [r for batch in answer(model, items, BENCHMARK_QUESTIONS, sampling, batch_size=8) for r in batch]
    assert callback_fed == fed * 2
    assert answers[False] == answers[True] == [r["prediction"] for r in records]
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions."
    )
    question = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert fed[0] == model.tokenizer(f"{system} USER: {'<image>' * 64}\n{question} ASSISTANT:")["input_ids"]


def test_shares_pad_every_rank_equally():
    items = list("abcde")
    shares = [rank_share(items, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    assert sorted(i for s in shares for i, _ in s if i >= 0) == [0, 1, 2, 3, 4]
    assert shares[1][-1][0] == -1  # the padding repeat is marked


# --------------------------------------------------------------------------------------------- two processes
DIST_EVAL = [
    "callbacks=eval",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "callbacks.checkpoint.export=none",
    "callbacks.extra.eval.every_n_steps=1",
    "callbacks.extra.eval.num_images=3",  # not a multiple of 2 ranks: one rank pads its share
    "callbacks.extra.eval.vqa=3",
    "callbacks.extra.eval.batch_size=2",
    "callbacks.extra.eval.max_new_tokens=1",
    "callbacks.extra.eval.force_image=true",
    "callbacks.extra.eval.vqa_max_new_tokens=3",
    "callbacks.extra.eval.judge_validation=50",
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_callbacks_under_two_processes(strategy, tmp_path):
    """DDP (every rank holds the model) and FSDP2 (sharded: lockstep generation): rank 0 logs each evaluation once,
    with the judge's figures over the whole subset and one grid per evaluation."""
    import csv

    from test_train_sweep import train_cli

    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    ensure_shapes_world(data_dir / "shapes", size=64, seed=0, num_workers=1, **WORLD)
    result = train_cli(
        f"trainer={strategy}",
        "stage=sft_mixed",
        "stage.init_from=null",
        *DIST_EVAL,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        *(f"data.shapes.{k}={v}" for k, v in WORLD.items()),
        "data.num_workers=0",
        "data.micro_batch_size=2",
        "stage.global_batch_size=4",
        "stage.num_samples=8",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    how = "sharded model: lockstep generation on all ranks" if strategy == "fsdp" else "each rank answers its share"
    assert f"on 2 rank(s): {how}" in result.stdout + result.stderr
    (run_dir,) = (log_dir / "runs").iterdir()
    with open(run_dir / "csv" / "metrics.csv") as f:
        all_rows = list(csv.DictReader(f))
    assert not any(r.get("eval/failed") for r in all_rows), (run_dir / "eval" / "errors.txt").read_text()
    rows = [r for r in all_rows if r.get("eval/judge_both")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(r["eval/image_rate"] == "100.0" and r["eval/vqa_accuracy"] != "" for r in rows)
    assert sorted(p.name for p in (run_dir / "eval").glob("*.png")) == ["step_0000001.png", "step_0000002.png"]
    assert Image.open(run_dir / "eval" / "step_0000002.png").size == (3 * 128, 128 + 14)
