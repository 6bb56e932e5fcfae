"""The benchmark runner behind ``src/eval.py``: load a model, answer benchmarks in batches, write, score, log.

For each benchmark, ``<out_dir>/<benchmark>/`` receives ``predictions.jsonl`` (one ``item.record(prediction)``
line per question, with the prompt and answer lengths in tokens, appended batch by batch and flushed) and
``scores.json`` (``benchmarks.score``, ``errors``, ``over_position_limit`` and the throughput of this session).
A rerun of the same command resumes: the ids already in the predictions file are skipped (a line cut short by a
crash is dropped). The output folder's name hashes the settings that define the predictions (conf/eval.yaml
``run_name``), and ``run.json`` in each benchmark folder records them all (checkpoint, model, tokenizer, dtype,
data root, the benchmark files' fingerprint, limit, sampling, prompt format): predictions made with any other
value are never resumed or scored; the run stops and names what differs. Scores go to MLflow (one run per output
folder, continued on resume, params = the resolved config) with the files as artifacts, and a table is printed.

``shapes`` (no data needed) is the shapes world's held-out split (:mod:`vargpt.eval.shapes_eval`):
``vqa_predictions.jsonl``, ``t2i_predictions.jsonl`` with the generated images under ``images/``, and both
scores (VQA accuracy; the judge's colour / shape / both accuracy; CLIP score matched vs shuffled when a CLIP
judge is configured).

Benchmark questions are asked as lmms-eval's VARGPT wrapper asks them (docs/evaluation.md): the task's prompt
with ``<image>`` tokens (space-separated, one per visual) and a newline put first when it holds none
(:func:`evaluation_context`), rendered as ONE string by the Vicuna v1 template with the system prompt (or the
tokenizer's own chat template), image tokens expanded, encoded with BOS (``vargpt.inference.generate(model, ...,
prompt_format="evaluation")``). Generation is batched, KV-cached and left-padded, greedy by default, with the
task's ``max_new_tokens`` and no stop string (the wrapper drops the tasks' ``until``); the answer is the reply
after its last ``ASSISTANT:`` (:func:`extract_answer`), stripped. As in the wrapper, a prompt longer than the
LLM's position limit is run, not refused; the rows whose prompt and answer exceed the limit are counted in
``over_position_limit``. A batch that raises is retried one item at a time; an item that still fails gets an
empty prediction with an ``error`` field and is counted in ``errors``. The training-time callback
(:mod:`vargpt.eval.callbacks`) and the shapes evaluation ask and draw through the same functions
(:mod:`vargpt.eval.core`); the files are :mod:`vargpt.eval.predictions`, the benchmarks :mod:`vargpt.eval.benchmarks`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vargpt.eval import shapes_eval as se
from vargpt.eval.benchmarks import (
    BENCHMARKS,
    SHAPES,
    benchmark_fingerprint,
    get_benchmark,
    headline,
    read_benchmark,
    score,
)
from vargpt.eval.core import BENCHMARK_QUESTIONS, CHAT_QUESTIONS, answer, draw, evaluation_prompt_settings
from vargpt.eval.judge import ShapesJudge
from vargpt.eval.predictions import PREDICTIONS, SCORES, append_records, check_run_file, read_predictions
from vargpt.inference.loading import load_model, resolve_device
from vargpt.model.sampling_config import SamplingConfig
from vargpt.training import tracking

log = logging.getLogger(__name__)

# Counts the table shows under the headline figures whenever they are not 0.
WARNING_COUNTS = ("errors", "over_position_limit")


# ------------------------------------------------------------------------------------------------ benchmarks
def run_benchmark(
    model: Any,
    benchmark: str,
    data_root: str | Path,
    out_dir: Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    sampling: Any = None,
    max_new_tokens: int | None = None,
    faithful: bool = True,
    settings: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, float]:
    """Answer (or finish answering) one benchmark, write its predictions and scores; returns the scores.

    ``run.json`` records ``settings`` (the model's) and everything else that defines the predictions: the
    benchmark, the data root, the fingerprint of its files, ``limit``, the sampling and the prompt settings.
    """
    items = read_benchmark(benchmark, data_root, limit)  # checks files and columns now
    folder = out_dir / benchmark
    cfg = get_benchmark(benchmark).sampling(sampling, max_new_tokens)
    run = {
        **(settings or {}),
        "benchmark": benchmark,
        "data_root": str(Path(data_root).expanduser().resolve()),
        "files": benchmark_fingerprint(benchmark, data_root),
        "limit": limit,
        "sampling": cfg.to_dict(),
        "prompt": evaluation_prompt_settings(model),
    }
    check_run_file(folder, run)
    path = folder / PREDICTIONS
    done = {r["id"] for r in read_predictions(path)}
    if done:
        progress(f"{benchmark}: resuming after {len(done)} predictions in {path}")
    start, new = time.perf_counter(), 0
    todo = (item for item in items if item.id not in done)
    for records in answer(model, todo, BENCHMARK_QUESTIONS, cfg, batch_size, retry=True):
        new += append_records(path, records)
        progress(f"{benchmark}: {len(done) + new} answered")
    seconds = time.perf_counter() - start
    records = read_predictions(path)
    scores = score(benchmark, records, faithful=faithful)
    scores["errors"] = float(sum("error" in r for r in records))
    scores["over_position_limit"] = float(sum(bool(r.get("over_position_limit")) for r in records))
    if scores["over_position_limit"]:
        log.warning(
            "%s: %d row(s) ran past the LLM's %d positions (run as lmms-eval runs them: rotary positions "
            "extrapolate); see over_position_limit in %s",
            benchmark, scores["over_position_limit"], model.cfg.llm.max_position_embeddings, path,
        )  # fmt: skip
    if new:
        scores["questions_per_s"] = new / seconds
    (folder / SCORES).write_text(json.dumps(scores, indent=2))
    return scores


# ------------------------------------------------------------------------------------------------ shapes
def run_shapes(
    model: Any,
    out_dir: Path,
    *,
    config: Any = None,
    limit: int | None = None,
    batch_size: int = 8,
    sampling: Any = None,
    clip: Any = None,
    settings: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, float]:
    """The shapes world's held-out understanding and generation, resumable; returns ``vqa/...``, ``t2i/...`` and
    ``vqvae/psnr`` (recomputed each time: a second or two)."""
    c = se.ShapesEvalConfig.coerce(config)
    n_vqa, n_t2i = (c.vqa, c.t2i) if limit is None else (min(c.vqa, limit), min(c.t2i, limit))
    folder = out_dir / SHAPES
    t2i_sampling = SamplingConfig.coerce(sampling, max_new_tokens=c.t2i_max_new_tokens)
    run = {
        **(settings or {}),
        "benchmark": SHAPES,
        # What changes the predictions (not how many, nor how the judge is validated).
        "shapes": {
            k: v for k, v in vars(c).items() if k not in ("vqa", "t2i", "psnr", "judge_strict", "judge_validation")
        },
    }
    check_run_file(folder, {**run, "sampling": t2i_sampling.to_dict()})
    scores: dict[str, float] = {}

    n_psnr = c.psnr if limit is None else min(c.psnr, limit)
    if n_psnr:
        scores["vqvae/psnr"] = se.vqvae_psnr(model.vae_local, se.held_out_images(n_psnr, c.seed, c.size))
        scores["vqvae/n"] = float(n_psnr)

    vqa_path = folder / "vqa_predictions.jsonl"
    done = {r["id"] for r in read_predictions(vqa_path)}
    items = se.vqa_items(n_vqa, c.seed, c.size)
    todo = [item for item in items if item.id not in done]
    start, answered = time.perf_counter(), n_vqa - len(todo)
    for records in answer(model, todo, CHAT_QUESTIONS, se.vqa_sampling(c.vqa_max_new_tokens), batch_size):
        answered += append_records(vqa_path, records)
        progress(f"shapes VQA: {answered}/{n_vqa} answered")
    if todo:
        scores["vqa/questions_per_s"] = len(todo) / (time.perf_counter() - start)
    wanted = {item.id for item in items}
    vqa_records = [r for r in read_predictions(vqa_path) if r["id"] in wanted]
    if vqa_records:
        scores.update({f"vqa/{k}": v for k, v in se.score_vqa(vqa_records).items()})

    if n_t2i:
        judge = ShapesJudge(model.cfg.vqvae.image_size, strict=c.judge_strict, n_validation=c.judge_validation)
        t2i_path, image_dir = folder / "t2i_predictions.jsonl", folder / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        done = {r["id"] for r in read_predictions(t2i_path)}
        items = se.t2i_items(n_t2i, c.seed)
        todo = [item for item in items if item.id not in done]
        start, drawn, answered = time.perf_counter(), 0, n_t2i - len(todo)
        for batch in draw(model, todo, t2i_sampling, batch_size, judge=judge, force_image=c.force_image):
            records = []
            for record, image in batch:
                if image is not None:
                    image.save(image_dir / f"{record['id']}.png")
                    record["image"] = f"images/{record['id']}.png"
                    drawn += 1
                records.append(record)
            answered += append_records(t2i_path, records)
            progress(f"shapes text-to-image: {answered}/{n_t2i} instructions answered")
        if todo:
            scores["t2i/images_per_s"] = drawn / (time.perf_counter() - start)
        wanted = {item.id for item in items}
        t2i_records = [r for r in read_predictions(t2i_path) if r["id"] in wanted]
        scores.update({f"t2i/{k}": v for k, v in se.score_t2i(t2i_records).items()})
        confusion = se.position_confusion(t2i_records)
        (folder / "position_confusion.json").write_text(json.dumps(confusion, indent=2))
        progress("t2i positions, asked (rows) vs judged:\n" + se.format_position_confusion(confusion))
        if clip is not None:
            with_image = [r for r in t2i_records if r.get("image")]
            images = [Image.open(folder / r["image"]).convert("RGB") for r in with_image]
            texts = [se.description(r["scene"], r["requested"]) for r in with_image]
            scores.update({f"t2i/{k}": v for k, v in se.clip_figures(clip, images, texts).items()})
        scores["judge/validation_accuracy"] = 100 * judge.validation_accuracy
    (folder / SCORES).write_text(json.dumps(scores, indent=2))
    return scores


# ------------------------------------------------------------------------------------------------ the app
def benchmark_names(value: Any) -> list[str]:
    """The ``benchmarks`` setting as a list of known names (a name, a comma list or a list)."""
    names = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    known = [SHAPES, *BENCHMARKS]
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(known)}")
    if not names:
        raise ValueError(f"benchmarks is empty; known: {', '.join(known)}")
    return names


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The headline figures of each benchmark as an aligned table, then its :data:`WARNING_COUNTS` that are not
    0 (rows with an error, rows past the LLM's position limit)."""
    rows = [("benchmark", "metric", "value", "n")]
    for benchmark, scores in results.items():
        for metric in headline(benchmark):
            if metric in scores:
                # A shapes metric counts its own part (vqa/n, t2i/n); a benchmark has one n.
                n = scores.get(f"{metric.split('/')[0]}/n", scores.get("n", float("nan")))
                rows.append((benchmark, metric, f"{scores[metric]:.2f}", f"{int(n)}" if n == n else ""))
        for count in WARNING_COUNTS:
            if scores.get(count):
                rows.append((benchmark, count, f"{int(scores[count])}", f"{int(scores['n'])}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
             strict=True))) for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _clip_judge(cfg: DictConfig) -> Any:
    """The CLIP judge of ``clip`` (arch, local weights, model_cfg), or None when no weights are configured."""
    clip_cfg = cfg.get("clip")
    if clip_cfg is None or clip_cfg.get("weights") is None:
        log.info("no CLIP judge configured (clip.weights=null): CLIP scores are skipped")
        return None
    from vargpt.eval.clip_score import load_open_clip  # lazy: open_clip is heavy, needed only with CLIP weights

    model_cfg = OmegaConf.to_container(clip_cfg.model_cfg, resolve=True) if clip_cfg.get("model_cfg") else None
    return load_open_clip(str(clip_cfg.arch), str(clip_cfg.weights), model_cfg)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """``src/eval.py``: evaluate ``ckpt`` on ``benchmarks``, write files, log to MLflow, print the table."""
    names = benchmark_names(cfg.benchmarks)
    limit = None if cfg.limit is None else int(cfg.limit)
    for name in names:  # fail on missing files or columns before loading anything
        if name != SHAPES:
            read_benchmark(name, cfg.data_root, limit)
    out_dir = Path(str(cfg.out_dir)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(cfg.dtype)]
    model, what = load_model(cfg, out_dir)
    model = model.to(device=resolve_device(str(cfg.device)), dtype=dtype).eval()
    clip = _clip_judge(cfg) if SHAPES in names else None
    if clip is not None:
        clip.model.to(next(model.parameters()).device)
    settings = {
        "ckpt": None if cfg.ckpt is None else str(Path(str(cfg.ckpt)).expanduser().resolve()),
        "model": what,
        "tokenizer": None if cfg.get("tokenizer") is None else str(cfg.tokenizer),
        "seed": int(cfg.get("seed", 0)) if cfg.ckpt is None else None,  # the random model's
        "dtype": str(cfg.dtype),
    }
    log.info("evaluating %s on %s -> %s", what, ", ".join(names), out_dir)

    tags = {"kind": "eval", "model": what, "benchmarks": ",".join(names)}
    tags["git_sha"], dirty = tracking.git_state(Path(__file__).resolve().parents[3])
    tags["git_dirty"] = str(dirty).lower()
    resume_id = tracking.saved_run_id(out_dir)
    logger = tracking.build_logger(cfg, out_dir, tags, resume_id)
    tracking.record_run(logger, cfg, list(overrides), out_dir, new_run=resume_id is None)
    results: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            start = time.perf_counter()
            common = {"batch_size": int(cfg.batch_size), "sampling": cfg.sampling, "settings": settings}
            if name == SHAPES:
                scores = run_shapes(model, out_dir, config=cfg.shapes, limit=limit, clip=clip, **common)
            else:
                cap = None if cfg.get("max_new_tokens") is None else int(cfg.max_new_tokens)
                scores = run_benchmark(
                    model,
                    name,
                    cfg.data_root,
                    out_dir,
                    limit=limit,
                    max_new_tokens=cap,
                    faithful=bool(cfg.faithful),
                    **common,
                )
            results[name] = scores
            log.info("%s done in %.1f s: %s", name, time.perf_counter() - start, json.dumps(scores))
            if logger is not None:
                logger.log_metrics({f"{name}/{k}": v for k, v in scores.items() if v == v}, step=0)
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "log_artifacts") and hasattr(logger, "run_id"):
                    experiment.log_artifacts(logger.run_id, str(out_dir / name), artifact_path=name)
    except BaseException:
        if logger is not None:
            logger.finalize("failed")
        raise
    table = format_table(results)
    (out_dir / "scores.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.txt").write_text(table + "\n")
    print(f"\n{what}\n{table}\n\nfiles: {out_dir}\ntracking: {tracking.run_location(logger)}", flush=True)
    if logger is not None:
        logger.finalize("success")
    return results
