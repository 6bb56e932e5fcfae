"""Evaluation during training: a Lightning callback that draws, answers and judges on a fixed subset.

Every ``every_n_steps`` optimizer steps and at the end of training, on a fixed, seeded subset:

* image generation for a fixed prompt list (default: the shapes world's first held-out drawing instructions),
  logged as an image grid (``<run_dir>/eval/step_XXXXXXX.png``, and an MLflow artifact under ``eval/``);
* the CLIP score of those images with their prompts (and, for the shapes world, with shuffled prompts) when a
  CLIP judge is configured (``clip: {arch, weights, model_cfg}``);
* for the shapes world, the validated judge's colour / shape / both accuracy on those images;
* VQA accuracy on a fixed question subset: the shapes world's held-out questions, or the first questions of a
  benchmark's local files (``vqa_source: pope``, ``data_root``), asked and scored as ``src/eval.py`` does
  (lmms-eval's prompt: docs/evaluation.md), answers capped at ``vqa_max_new_tokens``.

Metrics land in the trainer's loggers under ``eval/`` at the current step, with ``eval/seconds`` (time spent).

Questions are answered and images drawn by :mod:`vargpt.eval.core`, the functions ``src/eval.py`` calls, so a
record (and every figure) is the same as offline on the same model and items.

Distributed runs: every rank answers its share of the subset (``core.rank_share``: shares padded to equal
length) and rank 0 gathers the records and images, scores and logs. Under DDP each rank holds the whole model, so
shares run independently. Under FSDP (parameters sharded) every forward is a collective, so all ranks must make
the same forward calls (``lockstep=True`` of the core): the root's parameters are gathered for the evaluation
(``unshard``), images are forced at the start of each reply (one image group, ``max_new_tokens=1``), and
answers run for exactly ``vqa_max_new_tokens`` steps with end-of-sequence masked, each answer cut where the
model would have ended it (shapes prompts must leave that many positions free in the LLM's context, else a row
would end early and the ranks would fall out of step; benchmark prompts run past the limit, as in ``src/eval.py``).

Enable it with ``python src/train.py callbacks=eval`` (``conf/callbacks/eval.yaml``: the default callbacks plus
this one under ``callbacks.extra.eval``).

Failures never stop training: an exception is logged with its traceback (and written to
``<run_dir>/eval/errors.txt``, logged to MLflow as well), ``eval/failed`` is logged as 1, and training goes on.
Under FSDP, a failure inside a forward on one rank cannot be recovered from (the others wait in a collective).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image, ImageDraw

from vargpt.eval import shapes_eval as se
from vargpt.eval.benchmarks import SHAPES, get_benchmark, read_benchmark, score
from vargpt.eval.core import BENCHMARK_QUESTIONS, CHAT_QUESTIONS, PromptItem, answer, draw, rank_share
from vargpt.eval.judge import ShapesJudge
from vargpt.model.sampling_config import SamplingConfig

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra's instantiate) as plain Python values."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def image_grid(
    images: Sequence[Image.Image | None], captions: Sequence[str] = (), columns: int = 8, tile: int = 128
) -> Image.Image:
    """Images as a grid of ``tile`` px tiles with a caption strip under each (a gray tile for a missing image)."""
    columns = max(1, min(columns, len(images) or 1))
    rows = -(-max(len(images), 1) // columns)
    strip = 14
    grid = Image.new("RGB", (columns * tile, rows * (tile + strip)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * tile, (i // columns) * (tile + strip)
        if image is None:
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(200, 200, 200))
            draw.text((x + 4, y + tile // 2 - 6), "no image", fill=(0, 0, 0))
        else:
            grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        if i < len(captions):
            draw.text((x + 2, y + tile + 1), captions[i][: tile // 6], fill=(0, 0, 0))
    return grid


class EvalCallback(Callback):
    """Periodic evaluation on a fixed subset (see the module docstring).

    Args:
        every_n_steps: optimizer steps between evaluations (0 = only at the end).
        at_end: also evaluate when training ends (unless the last step was just evaluated).
        num_images: images drawn, one per prompt of the fixed list.
        prompts: the drawing prompts; null = the shapes world's first ``num_images`` held-out instructions
            (then the judge rates them). Real data: a list of instructions.
        vqa: questions in the fixed VQA subset (0 = none).
        vqa_source: ``shapes`` (held-out questions) or a benchmark name read from ``data_root``.
        data_root: where benchmark copies live (``vqa_source`` other than shapes).
        seed: the shapes world's seed (which held-out samples); image sampling uses ``sampling.seed``.
        image_size: side of the shapes world's input images (``data.shapes.size``).
        batch_size: prompts per generate call on each rank.
        sampling: overrides of the image sampling (default: the release's, see conf/sampling/default.yaml).
        max_new_tokens: reply steps when drawing (text before/after the image).
        vqa_max_new_tokens: answer length (a benchmark's own lmms-eval length is capped at it).
        force_image: start each reply with its image (always under FSDP); false lets the model write first.
        judge: rate the shapes world's images with the validated judge.
        judge_validation: ground-truth scenes the judge validates itself on first (once per process).
        clip: ``{arch, weights, model_cfg}`` of an open_clip judge; null or no weights = no CLIP score.
        grid_columns: tiles per row of the logged grid.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        at_end: bool = True,
        num_images: int = 8,
        prompts: Sequence[str] | None = None,
        vqa: int = 32,
        vqa_source: str = SHAPES,
        data_root: str | None = None,
        seed: int = 0,
        image_size: int = 64,
        batch_size: int = 8,
        sampling: Mapping[str, Any] | None = None,
        max_new_tokens: int = 48,
        vqa_max_new_tokens: int = 8,
        force_image: bool = False,
        judge: bool = True,
        judge_validation: int = 200,
        clip: Mapping[str, Any] | None = None,
        grid_columns: int = 8,
    ) -> None:
        self.every_n_steps = int(every_n_steps)
        self.at_end = at_end
        self.num_images = int(num_images)
        self.prompts = list(_plain(prompts)) if prompts is not None else None
        self.vqa = int(vqa)
        self.vqa_source = vqa_source
        self.data_root = data_root
        self.seed = seed
        self.image_size = image_size
        self.batch_size = max(1, int(batch_size))
        self.sampling = dict(_plain(sampling) or {})
        self.max_new_tokens = max_new_tokens
        self.vqa_max_new_tokens = vqa_max_new_tokens
        self.force_image = force_image
        self.judge = judge
        self.judge_validation = int(judge_validation)
        self.clip_cfg = dict(_plain(clip) or {})
        self.grid_columns = grid_columns
        self._last_step = -1
        self._clip: Any = None
        self._judge: Any = None
        self.history: list[dict[str, float]] = []  # what was logged (rank 0), for tests and summaries

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        if trainer.fit_loop.epoch_loop._should_accumulate():  # mid optimizer step
            return
        self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    # ------------------------------------------------------------------ one evaluation
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Evaluate now on every rank, log on rank 0; never raises. Returns the logged metrics (rank 0)."""
        step = trainer.global_step
        self._last_step = step
        try:
            return self._run(trainer, pl_module, step)
        except Exception:  # the last line of defence: training must go on
            self._report_failure(trainer, step, traceback.format_exc())
            return None

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float] | None:
        start = time.perf_counter()
        model = pl_module.model if hasattr(pl_module, "model") else pl_module
        rank, world = trainer.global_rank, trainer.world_size
        lockstep = _is_sharded(model)
        if not self.history and trainer.is_global_zero:
            how = "sharded model: lockstep generation on all ranks" if lockstep else "each rank answers its share"
            log.info("evaluation at step %d on %d rank(s): %s", step, world, how)
        try:
            with _unsharded(model, lockstep):
                local = self._local_results(model, rank, world, lockstep)
        except Exception:  # reported by rank 0 after the gather, so that no rank waits for the others
            local = {"error": traceback.format_exc()}
        parts = _gather(local, world)
        if not trainer.is_global_zero:
            return None
        errors = [p["error"] for p in parts if "error" in p]
        if errors:
            raise RuntimeError(f"evaluation failed on {len(errors)} rank(s); first:\n{errors[0]}")
        metrics, grid = self._score(parts)
        metrics["eval/seconds"] = time.perf_counter() - start
        self._log(trainer, metrics, grid, step)
        self.history.append({"step": float(step), **metrics})
        log.info("eval at step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})
        return metrics

    def _local_results(self, model: Any, rank: int, world: int, lockstep: bool) -> dict[str, Any]:
        """This rank's share: VQA records and drawn (index, record, image) triples."""
        out: dict[str, Any] = {"vqa": [], "t2i": []}
        if self.vqa > 0:
            out["vqa"] = self._answer(model, rank_share(self._vqa_items(), rank, world), lockstep)
        if self.num_images > 0:
            out["t2i"] = self._draw(model, rank_share(self._t2i_items(), rank, world), lockstep)
        return out

    # ------------------------------------------------------------------ the subset
    def _vqa_items(self) -> list[Any]:
        if self.vqa_source == SHAPES:
            return se.vqa_items(self.vqa, self.seed, self.image_size)
        return list(read_benchmark(self.vqa_source, self.data_root or ".", limit=self.vqa))

    def _t2i_items(self) -> list[Any]:
        if self.prompts is None:
            return se.t2i_items(self.num_images, self.seed)
        return [PromptItem(index, prompt) for index, prompt in enumerate(self.prompts[: self.num_images])]

    # ------------------------------------------------------------------ generation
    def _answer(self, model: Any, shares: list[tuple[int, Any]], lockstep: bool) -> list[tuple[int, dict]]:
        """(index, record) per question, through :func:`vargpt.eval.core.answer` as ``src/eval.py`` asks: a
        benchmark's questions with lmms-eval's prompt and settings (answers capped at ``vqa_max_new_tokens``: a
        quick signal, not the score), the shapes world's in the training template its model learnt."""
        if self.vqa_source == SHAPES:
            questions, sampling = CHAT_QUESTIONS, se.vqa_sampling(self.vqa_max_new_tokens)
        else:
            sampling = get_benchmark(self.vqa_source).sampling(max_new_tokens=self.vqa_max_new_tokens)
            questions = BENCHMARK_QUESTIONS
        items = [item for _, item in shares]
        batches = answer(model, items, questions, sampling, self.batch_size, lockstep=lockstep)
        records = [record for batch in batches for record in batch]
        return [(index, record) for (index, _), record in zip(shares, records, strict=True)]

    def _draw(self, model: Any, shares: list[tuple[int, Any]], lockstep: bool) -> list[tuple[int, dict, Any]]:
        """(index, record, image or None) per prompt, through :func:`vargpt.eval.core.draw` as ``src/eval.py``
        draws; shapes instructions are judged when ``judge`` is on."""
        sampling = SamplingConfig.coerce(self.sampling, max_new_tokens=self.max_new_tokens)
        judge = None
        if self.judge and self.prompts is None:
            if self._judge is None:  # validates itself once
                self._judge = ShapesJudge(model.cfg.vqvae.image_size, n_validation=self.judge_validation)
            judge = self._judge
        items = [item for _, item in shares]
        batches = draw(
            model, items, sampling, self.batch_size, judge=judge, force_image=self.force_image, lockstep=lockstep
        )
        drawn = [pair for batch in batches for pair in batch]
        return [(index, record, image) for (index, _), (record, image) in zip(shares, drawn, strict=True)]

    # ------------------------------------------------------------------ scoring and logging (rank 0)
    def _score(self, parts: list[dict[str, Any]]) -> tuple[dict[str, float], Image.Image | None]:
        vqa = sorted({index: r for p in parts for index, r in p["vqa"] if index >= 0}.items())
        t2i = sorted({index: (r, im) for p in parts for index, r, im in p["t2i"] if index >= 0}.items())
        metrics: dict[str, float] = {}
        if vqa:
            records = [r for _, r in vqa]
            if self.vqa_source == SHAPES:
                metrics["eval/vqa_accuracy"] = se.score_vqa(records)["accuracy"]
            else:
                scores = score(self.vqa_source, records)
                metrics.update({f"eval/{self.vqa_source}/{k}": v for k, v in scores.items() if k != "n"})
                metrics["eval/vqa_accuracy"] = scores[get_benchmark(self.vqa_source).headline[0]]
        grid = None
        if t2i:
            records = [r for _, (r, _) in t2i]
            images = [im for _, (_, im) in t2i]
            metrics["eval/image_rate"] = 100.0 * sum(r["has_image"] for r in records) / len(records)
            if self.prompts is None and self.judge:
                scores = se.score_t2i(records)
                metrics.update({f"eval/judge_{k}": scores[k] for k in ("colour", "shape", "both")})
            texts = [se.description(r["scene"], r["requested"]) if "scene" in r else r["prompt"] for r in records]
            drawn = [(im, text) for im, text in zip(images, texts, strict=True) if im is not None]
            clip = self._clip_judge()
            if clip is not None and len(drawn) >= 2:
                figures = se.clip_figures(clip, [im for im, _ in drawn], [text for _, text in drawn])
                metrics["eval/clip_score"] = figures["clip_matched"]
                metrics["eval/clip_score_shuffled"] = figures["clip_shuffled"]
            captions = []
            for r in records:
                mark = "" if "both" not in r or not r["has_image"] else ("ok: " if r["both"] else "x: ")
                captions.append(mark + self._caption(r))
            grid = image_grid(images, captions, self.grid_columns)
        return metrics, grid

    @staticmethod
    def _caption(record: Mapping[str, Any]) -> str:
        if "scene" in record:
            return " & ".join(f"{o['colour']} {o['shape']}" for o in record["scene"]["objects"])
        return str(record.get("prompt", ""))

    def _clip_judge(self) -> Any:
        if self._clip is None and self.clip_cfg.get("weights"):
            from vargpt.eval.clip_score import load_open_clip  # lazy: open_clip is heavy, needed only with weights

            c = self.clip_cfg
            self._clip = load_open_clip(c.get("arch", "ViT-B-32"), c["weights"], c.get("model_cfg"))
        return self._clip

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        path = Path(trainer.default_root_dir) / "eval"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], grid: Image.Image | None, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if grid is not None:
            path = self._out_dir(trainer) / f"step_{step:07d}.png"
            grid.save(path)
            _log_artifact(trainer, path)

    def _report_failure(self, trainer: pl.Trainer, step: int, text: str) -> None:
        log.error("evaluation at step %d failed (training continues):\n%s", step, text)
        try:
            path = self._out_dir(trainer) / "errors.txt"
            with path.open("a") as f:
                f.write(f"== step {step}\n{text}\n")
            _log_artifact(trainer, path)
            for logger in trainer.loggers:
                logger.log_metrics({"eval/failed": 1.0}, step=step)
        except Exception:  # reporting must not fail the run either
            log.exception("could not record the evaluation failure")


# ------------------------------------------------------------------------------------------------ helpers
def _log_artifact(trainer: pl.Trainer, path: Path) -> None:
    """Attach a file to every MLflow logger's run (under ``eval/``)."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="eval")


def _gather(local: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Every rank's results on every rank (pickled objects), or just ours in a single process."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    return parts


def _is_sharded(model: Any) -> bool:
    """Whether the model's parameters are sharded (FSDP2): then every forward is a collective."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(model, FSDPModule)


class _unsharded:  # noqa: N801 - used as a context manager
    """Gather the root's sharded parameters for the evaluation (FSDP2); a no-op otherwise."""

    def __init__(self, model: Any, sharded: bool) -> None:
        self.model, self.sharded = model, sharded

    def __enter__(self) -> None:
        if self.sharded:
            self.model.unshard()

    def __exit__(self, *exc: Any) -> None:
        if self.sharded:
            self.model.reshard()
