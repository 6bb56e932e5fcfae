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
tokenizer's own chat template), image tokens expanded, encoded with BOS (``model.generate(...,
prompt_format="evaluation")``). Generation is batched, KV-cached and left-padded, greedy by default, with the
task's ``max_new_tokens`` and no stop string (the wrapper drops the tasks' ``until``); the answer is the reply
after its last ``ASSISTANT:`` (:func:`extract_answer`), stripped. As in the wrapper, a prompt longer than the
LLM's position limit is run, not refused; the rows whose prompt and answer exceed the limit are counted in
``over_position_limit``. A batch that raises is retried one item at a time; an item that still fails gets an
empty prediction with an ``error`` field and is counted in ``errors``. The training-time callback
(:mod:`vargpt.eval.callbacks`) asks its benchmark questions through the same :func:`answer_items`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vargpt.checkpoint.released import MODEL_CONFIG_FILE
from vargpt.data.chat import SYSTEM_PROMPT
from vargpt.eval.benchmarks import BENCHMARKS, BenchmarkItem, benchmark_fingerprint, get_spec, read_benchmark, score
from vargpt.model.generation import GenerationOutput
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.tokens import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

SHAPES = "shapes"
PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
RUN_FILE = "run.json"
# The figures the table shows per benchmark (everything is in scores.json and MLflow).
HEADLINE: dict[str, tuple[str, ...]] = {
    "vqav2": ("accuracy",),
    "gqa": ("accuracy",),
    "textvqa": ("accuracy",),
    "vizwiz": ("accuracy",),
    "scienceqa_img": ("accuracy",),
    "pope": ("adversarial/pope_accuracy", "pope_accuracy", "pope_f1_score", "predicted_yes_ratio"),
    "mme": ("perception", "cognition"),
    "mmbench": ("accuracy",),
    "seedbench": ("image/accuracy", "all/accuracy"),
    "mmmu": ("accuracy",),
    SHAPES: ("vqa/accuracy", "t2i/both", "t2i/colour", "t2i/shape", "t2i/image_rate", "t2i/reply_objects",
             "t2i/both_when_reply_right", "t2i/position", "t2i/position_objects", "t2i/position_chance",
             "t2i/clip_matched", "t2i/clip_shuffled", "vqvae/psnr"),
}  # fmt: skip
# Counts the table shows under the headline figures whenever they are not 0.
WARNING_COUNTS = ("errors", "over_position_limit")
# The answer markers lmms-eval's LLaVA-style wrappers split the decoded output at, by chat template.
ANSWER_MARKERS = ("ASSISTANT:", "<|assistant|>", "[/INST]")


# ------------------------------------------------------------------------------------------------ model
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _world_tokenizer(cfg: DictConfig, out_dir: Path | None) -> Any:
    """The shapes world's tokenizer when the world is built (``<paths.data_dir>/shapes/tokenizer``); else, with
    an ``out_dir``, a throwaway one trained on a slice of the world's text (random models only), else None."""
    from vargpt.data.shapes import split_counts, world_texts
    from vargpt.data.tokenizer import load_tokenizer, train_world_tokenizer

    world = Path(str(cfg.paths.data_dir)) / "shapes" / "tokenizer"
    if world.is_dir():
        log.info("tokenizer: the shapes world's, %s", world)
        return load_tokenizer(world)
    if out_dir is None:
        return None
    return train_world_tokenizer(world_texts(split_counts(400), seed=0), out_dir / "tokenizer", vocab_size=1000)


def load_model(cfg: DictConfig, out_dir: Path) -> tuple[torch.nn.Module, str]:
    """The model to evaluate and a description of it, from ``ckpt``:

    * an exported / released folder (config and tokenizer inside), or a training run folder (its ``export/``);
    * a checkpoint file (Lightning ``.ckpt``, ``.safetensors``, ``.pth``) of the ``model`` config, with
      ``tokenizer``, ``model.tokenizer`` or the shapes world's tokenizer;
    * null: the ``model`` config with random weights (smoke tests), with the world's tokenizer.
    """
    from vargpt.checkpoint import build_from_folder, load_weights
    from vargpt.data.tokenizer import load_tokenizer
    from vargpt.model.config import ModelConfig
    from vargpt.model.vargpt import build_vargpt

    ckpt = None if cfg.ckpt is None else Path(str(cfg.ckpt)).expanduser()
    tokenizer = None if cfg.get("tokenizer") is None else load_tokenizer(cfg.tokenizer)
    if ckpt is not None and ckpt.is_dir() and (ckpt / "export").is_dir():
        ckpt = ckpt / "export"  # a training run folder
    if ckpt is not None and ckpt.is_dir():
        check_model_folder(ckpt)
        model, _ = build_from_folder(ckpt)
        model.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if model.tokenizer is None:
            raise ValueError(f"ckpt={ckpt} holds no tokenizer: pass tokenizer=DIR")
        return model, f"folder {ckpt}"
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    if tokenizer is None and model_cfg.tokenizer:
        tokenizer = load_tokenizer(model_cfg.tokenizer)
    if ckpt is None:
        tokenizer = tokenizer if tokenizer is not None else _world_tokenizer(cfg, out_dir)
        torch.manual_seed(int(cfg.get("seed", 0)))  # the same random model every run (resumable smoke tests)
        model = build_vargpt(model_cfg, tokenizer)
        log.warning("ckpt=null: the %s model has random weights (a smoke test, not a real model)", model_cfg.name)
        return model, f"random {model_cfg.name}"
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: no such file or folder")
    tokenizer = tokenizer if tokenizer is not None else _world_tokenizer(cfg, None)
    if tokenizer is None:
        raise ValueError(f"no tokenizer for ckpt={ckpt}: pass tokenizer=DIR or set model.tokenizer")
    model = build_vargpt(model_cfg, tokenizer)
    load_weights(model, ckpt, strict=True)
    return model, f"{model_cfg.name} weights from {ckpt}"


def check_model_folder(folder: Path) -> None:
    """Refuse a ``ckpt`` folder that holds no model (no ``model_config.yaml``, no ``config.json``), naming the next
    step: a training run folder whose export is missing (its training stopped before the export, or the export
    was deleted), or an unknown folder."""
    if (folder / MODEL_CONFIG_FILE).is_file() or (folder / "config.json").is_file():
        return
    if (folder / "checkpoints").is_dir():
        checkpoints = sorted((folder / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
        files = f" (newest: {checkpoints[-1]})" if checkpoints else " (it holds no .ckpt file)"
        raise FileNotFoundError(
            f"ckpt={folder} is a training run folder without an export/ folder: its training has not finished "
            f"exporting. Rerun the training command of this run to finish it (it writes {folder / 'export'}), or "
            f"evaluate a checkpoint file of {folder / 'checkpoints'}{files} with ckpt=<that file> and the run's "
            "model=<model config>"
        )
    raise FileNotFoundError(
        f"ckpt={folder} is neither an exported or released model folder ({MODEL_CONFIG_FILE} or config.json) nor a "
        "training run folder (export/): pass one of those, or a checkpoint file"
    )


# ------------------------------------------------------------------------------------------------ files
def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file; a last line cut short by an interrupted write is dropped (and cut
    from the file, so appending continues cleanly). A broken line elsewhere is an error."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON; delete the file to start over") from None
            log.warning("%s: dropping an incomplete last line (interrupted write)", path)
    if lines[-1]:  # the file does not end with a newline: rewrite it from the complete records
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def append_records(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Append records as JSON lines and flush; returns how many."""
    n = 0
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
    return n


def _differences(previous: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs: ``key: old -> new``; for the benchmark files, which ones changed."""
    lines = []
    for key in sorted(set(previous) | set(settings)):
        old, new = previous.get(key), settings.get(key)
        if old == new:
            continue
        if key == "files":  # {file: [size, mtime]}: name the files, not their numbers
            old, new = old or {}, new or {}
            changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            lines.append(f"  files: added, removed or rewritten since: {', '.join(changed[:5])}{more}")
        else:
            lines.append(f"  {key}: {json.dumps(old)} -> {json.dumps(new)}")
    return lines


def check_run_file(folder: Path, settings: Mapping[str, Any]) -> None:
    """Write ``run.json`` with what defines the predictions; refuse to resume predictions made otherwise.

    Raises:
        ValueError: the folder holds predictions and its ``run.json`` (or its absence) differs from ``settings``;
            the message lists every difference and the two ways out.
    """
    path = folder / RUN_FILE
    settings = json.loads(json.dumps(settings))  # normalise tuples etc.
    if any(folder.glob("*.jsonl")):
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if previous != settings:
            raise ValueError(
                f"{folder} holds predictions made with other settings ({path}):\n"
                + "\n".join(_differences(previous, settings))
                + f"\nThey are not resumed or scored. Use another out_dir (or run_name), or delete {folder} to "
                "start this benchmark over."
            )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


# ------------------------------------------------------------------------------------------------ benchmarks
def evaluation_context(item: BenchmarkItem) -> str:
    """lmms-eval's context for the model (VARGPT wrapper): the task's prompt, with one ``<image>`` per visual,
    space-separated, and a newline put first when the prompt holds no ``<image>`` (it never does in our ten
    tasks; MMMU's ``<image 1>`` is not one)."""
    if IMAGE_PLACEHOLDER in item.prompt:
        return item.prompt
    return " ".join([IMAGE_PLACEHOLDER] * len(item.images)) + "\n" + item.prompt


def answer_marker(tokenizer: Any) -> str:
    """The marker the wrapper splits its decoded output at: the first of :data:`ANSWER_MARKERS` in the chat
    template in use (the tokenizer's, else the Vicuna template, which holds ``ASSISTANT:``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return next((marker for marker in ANSWER_MARKERS if marker in template), ANSWER_MARKERS[0])


def extract_answer(reply: str, marker: str) -> str:
    """The wrapper's answer: the text after the last ``marker``, stripped. Its decoded output holds the prompt,
    which ends with the marker, so a reply without one is kept whole."""
    return reply.split(marker)[-1].strip()


def evaluation_prompt_settings(model: Any) -> dict[str, Any]:
    """The prompt settings :func:`answer_items` uses with this model's tokenizer (recorded in ``run.json``)."""
    template = getattr(model.tokenizer, "chat_template", None)
    return {
        "format": "evaluation",
        "template": template or "vicuna_v1",
        "system": None if template else SYSTEM_PROMPT,
        "answer_marker": answer_marker(model.tokenizer),
        "past_max_positions": True,
    }


def answer_items(
    model: Any, items: Sequence[BenchmarkItem], sampling: SamplingConfig, logits_processor: Any = None
) -> list[GenerationOutput]:
    """The model's replies to benchmark questions, asked as lmms-eval's VARGPT wrapper asks them (see the module
    docstring); take the answers with :func:`extract_answer`."""
    return model.generate(
        [evaluation_context(item) for item in items],
        [item.images for item in items],
        sampling=sampling,
        prompt_format="evaluation",
        past_max_positions=True,
        logits_processor=logits_processor,
    )


def benchmark_sampling(benchmark: str, base: Any = None, max_new_tokens: int | None = None) -> SamplingConfig:
    """``base`` (greedy by default) with the benchmark's lmms-eval length (capped at ``max_new_tokens`` when
    given), no stop string (the wrapper drops the tasks' ``until``) and no images."""
    spec = get_spec(benchmark)
    length = spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, int(max_new_tokens))
    return SamplingConfig.coerce(base, max_new_tokens=length, stop=[], max_images=0)


def _answer_records(model: Any, items: Sequence[BenchmarkItem], sampling: SamplingConfig) -> list[dict[str, Any]]:
    """Prediction records of a batch, with the prompt and answer lengths in tokens and whether they ran past the
    LLM's position limit; item by item when the batch raises, an item that still raises gets an ``error``."""
    try:
        outputs = answer_items(model, items, sampling)
    except ValueError as exc:
        if len(items) > 1:
            return [record for item in items for record in _answer_records(model, [item], sampling)]
        log.warning("item %s failed: %s", items[0].id, exc)
        return [{**items[0].record(""), "error": str(exc)}]
    marker, limit = answer_marker(model.tokenizer), int(model.cfg.llm.max_position_embeddings)
    records = []
    for item, out in zip(items, outputs, strict=True):
        prompt_tokens, answer_tokens = len(out.prompt_ids), len(out.token_ids)
        records.append({
            **item.record(extract_answer(out.text, marker)),
            "prompt_tokens": prompt_tokens,
            "answer_tokens": answer_tokens,
            "over_position_limit": prompt_tokens + answer_tokens > limit,
        })  # fmt: skip
    return records


def predict(
    model: Any, items: Iterable[BenchmarkItem], sampling: SamplingConfig, batch_size: int, skip: set[str]
) -> Iterator[list[dict[str, Any]]]:
    """Prediction records, one list per batch, of the items not in ``skip``."""
    batch: list[BenchmarkItem] = []
    for item in items:
        if item.id in skip:
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield _answer_records(model, batch, sampling)
            batch = []
    if batch:
        yield _answer_records(model, batch, sampling)


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
    cfg = benchmark_sampling(benchmark, sampling, max_new_tokens)
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
    for records in predict(model, items, cfg, batch_size, done):
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
    from PIL import Image

    from vargpt.eval import shapes_eval as se
    from vargpt.eval.judge import ShapesJudge

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
    for batch in se.batched(todo, batch_size):
        answered += append_records(vqa_path, se.answer_vqa(model, batch, batch_size, c.vqa_max_new_tokens))
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
        for batch in se.batched(todo, batch_size):
            records = []
            for record, image in se.draw_t2i(model, batch, judge, t2i_sampling, batch_size, c.force_image):
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
        for metric in HEADLINE.get(benchmark, ()):
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
    from vargpt.eval.clip_score import load_open_clip

    model_cfg = OmegaConf.to_container(clip_cfg.model_cfg, resolve=True) if clip_cfg.get("model_cfg") else None
    return load_open_clip(str(clip_cfg.arch), str(clip_cfg.weights), model_cfg)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """``src/eval.py``: evaluate ``ckpt`` on ``benchmarks``, write files, log to MLflow, print the table."""
    from vargpt.training import tracking

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
