"""Evaluate a model on the shapes world's held-out (validation) split: understanding and generation.

Held-out samples are made on the fly with ``shapes.make_sample_spec(task, "val", i, seed)``, the pure function
the world's shards are written from, so nothing has to be on disk and every machine sees the same questions.
Half of them use wordings and (shape, colour) combinations never seen in training (``unseen_wording`` /
``unseen_combo``), reported separately.

* VQA: the user turn of each held-out question (``<image>`` + question + the short-answer suffix) with its image
  rendered at the world's size, answered greedily through ``vargpt.inference.generate`` (the chat template); right
  when the VQA normaliser makes prediction and answer equal (``vargpt.eval.vqa.normalize_answer``).
* Text-to-image: each held-out instruction, answered with the release's sampling defaults (the model writes
  its reply and starts the image itself unless ``force_image``); the image is judged by the validated
  :mod:`vargpt.eval.judge` on colour, shape, both (and size / position / background when the instruction
  asked for them). A reply without an image counts as wrong. ``reply_objects`` is the share of replies whose
  text names every asked object as "<colour> <shape>" (the world's replies restate the instruction before the
  image), and ``both_when_reply_right`` the judge's ``both`` over those: together they tell a language model
  that rewrote the instruction from an image that did not follow its own reply. Each record also carries
  ``matched``: per asked object, the attributes of the drawn object the judge compared it with (None: not
  drawn). From those, :func:`position_confusion` counts asked against drawn cells and :func:`position_figures`
  gives the position figures with their chance level (a model that ignores the asked position scores
  ``position_chance``; ``t2i/position`` itself needs every asked object in its cell, two of them for a third of
  the instructions, so its chance is lower still).
* CLIP score (optional: only with a CLIP judge, e.g. the world's own open_clip): generated images against
  their own descriptions and against another sample's (shuffled); a model that follows its instructions
  scores clearly higher on the matched pairs.
* Helpers for the pretrained backbones: VQ-VAE reconstruction PSNR on held-out images and the judge accuracy
  of a class-conditional VAR.

Items and scores live here; the model answers and draws through :mod:`vargpt.eval.core` (``answer`` with
``CHAT_QUESTIONS``, ``draw`` with a judge), the same functions ``src/eval.py`` (which writes predictions files and
resumes) and the training callbacks (which shard a small subset over ranks) call; :func:`evaluate_shapes` runs all
of it in memory and returns the figures.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vargpt.data.shapes import COLOURS, POSITIONS, SHAPES, Scene, describe, make_sample_spec, render_scene
from vargpt.eval.core import CHAT_QUESTIONS, answer, batched, draw
from vargpt.eval.judge import ShapesJudge, get_judge
from vargpt.model.sampling_config import SamplingConfig

log = logging.getLogger(__name__)

SPLIT = "val"
# The judged cell of an asked object that the image does not show (fewer objects drawn than asked).
NOT_DRAWN = "none"


@dataclass(frozen=True)
class ShapesItem:
    """One held-out sample: its prompt (the user turn), its input images, and what is needed to score it."""

    id: str
    index: int  # position in the held-out split of its task (seeds its generation: resumable, batch-free)
    task: str  # vqa | t2i
    prompt: str
    images: list[Image.Image]
    answer: str | None  # VQA only
    scene: dict[str, Any] | None  # t2i only: the asked scene (ground truth of the image to draw)
    requested: list[str] = field(default_factory=list)  # t2i only: the attributes the instruction names
    fields: dict[str, Any] = field(default_factory=dict)  # question_type, unseen_wording, unseen_combo

    def record(self, **values: Any) -> dict[str, Any]:
        """The JSON-serialisable predictions-file line (everything but the images)."""
        out = {"id": self.id, "task": self.task, "prompt": self.prompt, **self.fields}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.scene is not None:
            out["scene"], out["requested"] = self.scene, self.requested
        return {**out, **values}


def vqa_items(n: int, seed: int = 0, size: int = 64, start: int = 0) -> list[ShapesItem]:
    """Held-out VQA questions ``start .. start + n - 1`` with their images rendered at ``size`` px."""
    items = []
    for i in range(start, start + n):
        spec = make_sample_spec("vqa", SPLIT, i, seed)
        items.append(
            ShapesItem(
                id=spec.id,
                index=i,
                task="vqa",
                prompt=spec.messages[0]["content"],
                images=[render_scene(scene, size) for scene in spec.scenes],
                answer=spec.meta["answer"],
                scene=None,
                fields={k: spec.meta[k] for k in ("question_type", "unseen_wording", "unseen_combo")},
            )
        )
    return items


def t2i_items(n: int, seed: int = 0, start: int = 0, split: str = SPLIT) -> list[ShapesItem]:
    """Text-to-image instructions ``start .. start + n - 1`` of ``split`` (the held-out one by default) with the
    scene each asks for."""
    items = []
    for i in range(start, start + n):
        spec = make_sample_spec("t2i", split, i, seed)
        items.append(
            ShapesItem(
                id=spec.id,
                index=i,
                task="t2i",
                prompt=spec.messages[0]["content"],
                images=[],
                answer=None,
                scene=spec.meta["attributes"][0],
                requested=list(spec.meta["requested"][0]),
                fields={k: spec.meta[k] for k in ("unseen_wording", "unseen_combo")},
            )
        )
    return items


def description(scene: Mapping[str, Any], requested: Sequence[str]) -> str:
    """The scene described with the attributes its instruction named (what the CLIP judge compares with)."""
    return describe(
        Scene.from_dict(dict(scene)), "size" in requested, "position" in requested, "background" in requested
    )


# ------------------------------------------------------------------------------------------------ VQA
def vqa_sampling(max_new_tokens: int = 16, base: SamplingConfig | Mapping[str, Any] | None = None) -> SamplingConfig:
    """Greedy short answers, no image allowed (a question never asks for one)."""
    return SamplingConfig.coerce(base, greedy=True, max_new_tokens=max_new_tokens, max_images=0)


def _percent(values: Sequence[float]) -> float:
    return 100.0 * float(np.mean(values)) if len(values) else float("nan")


def score_vqa(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy in percent: overall, per question type, on unseen wordings and on unseen combinations."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups["accuracy"].append(r["correct"])
        groups[f"{r['question_type']}/accuracy"].append(r["correct"])
        for flag in ("unseen_wording", "unseen_combo"):
            if r.get(flag):
                groups[f"{flag}/accuracy"].append(r["correct"])
    return {"n": float(len(records)), **{name: _percent(values) for name, values in sorted(groups.items())}}


# ------------------------------------------------------------------------------------------------ text-to-image
def score_t2i(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Judge accuracies in percent (colour, shape, both, and size / position / background over the instructions
    that asked for them), the share of replies with an image, ``both`` on unseen wordings / combinations, the
    share of replies naming every asked object and ``both`` over those replies; and :func:`position_figures`."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups["image_rate"].append(r["has_image"])
        for name in ("colour", "shape", "both", "count", "size", "position", "background"):
            if name in r:
                groups[name].append(r[name])
        for flag in ("unseen_wording", "unseen_combo"):
            if r.get(flag):
                groups[f"{flag}/both"].append(r["both"])
        if "reply_objects" in r:  # records written before this figure existed lack it
            groups["reply_objects"].append(r["reply_objects"])
            if r["reply_objects"]:
                groups["both_when_reply_right"].append(r["both"])
    scores = {name: _percent(values) for name, values in sorted(groups.items())}
    return {"n": float(len(records)), **scores, **position_figures(records)}


def _asked_and_drawn(records: Sequence[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], dict[str, str] | None]]:
    """(asked object, matched drawn object or None) over the instructions that asked for positions."""
    for r in records:
        if "position" in r.get("requested", ()) and "matched" in r:  # older records lack ``matched``
            yield from zip(r["scene"]["objects"], r["matched"], strict=True)


def position_confusion(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """``{asked cell: {judged cell or NOT_DRAWN: count}}`` over every asked object of the instructions that asked
    for positions (all 9 x 10 cells present, zeros included)."""
    confusion = {asked: dict.fromkeys((*POSITIONS, NOT_DRAWN), 0) for asked in POSITIONS}
    for asked, drawn in _asked_and_drawn(records):
        confusion[asked["position"]][NOT_DRAWN if drawn is None else drawn["position"]] += 1
    return confusion


def position_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Position figures per asked object, in percent (empty without position-asking records that carry
    ``matched``):

    * ``position_objects``: asked objects whose drawn object lies in the asked cell;
    * ``position_chance``: the same for a model that ignores the asked cell, from the confusion's margins
      (sum over cells of asked share x judged share);
    * ``position_when_found``: over the asked objects drawn in the right colour and shape (``..._n`` of them;
      left out when there are none)."""
    pairs = list(_asked_and_drawn(records))
    if not pairs:
        return {}
    confusion = position_confusion(records)
    asked_n = {cell: sum(row.values()) for cell, row in confusion.items()}
    judged_n = {cell: sum(row[cell] for row in confusion.values()) for cell in POSITIONS}
    chance = sum(asked_n[cell] * judged_n[cell] for cell in POSITIONS) / len(pairs) ** 2
    hits = [drawn is not None and drawn["position"] == asked["position"] for asked, drawn in pairs]
    found = [
        drawn["position"] == asked["position"]
        for asked, drawn in pairs
        if drawn is not None and (drawn["colour"], drawn["shape"]) == (asked["colour"], asked["shape"])
    ]
    figures = {"position_objects": _percent(hits), "position_chance": 100.0 * chance}
    if found:  # left out rather than NaN, which never equals itself (a resumed run compares its scores)
        figures["position_when_found"] = _percent(found)
    return {**figures, "position_when_found_n": float(len(found))}


def format_position_confusion(confusion: Mapping[str, Mapping[str, int]]) -> str:
    """The confusion as a text table: one row per asked cell, one column per judged cell (and NOT_DRAWN)."""
    columns = [*POSITIONS, NOT_DRAWN]
    width = max(len(c) for c in columns) + 1
    lines = ["asked \\ judged".ljust(width) + "".join(c.rjust(width) for c in columns)]
    lines += [
        asked.ljust(width) + "".join(str(row[c]).rjust(width) for c in columns) for asked, row in confusion.items()
    ]
    return "\n".join(lines)


def clip_figures(clip: Any, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, float]:
    """CLIP score of images with their own texts (``clip_matched``) and with the next sample's text
    (``clip_shuffled``, a derangement), and their difference; empty with fewer than two images."""
    from vargpt.eval.clip_score import clip_scores  # lazy: open_clip is heavy, needed only with a CLIP judge

    if len(images) < 2:
        return {}
    matched = clip_scores(clip, list(images), list(texts)).mean().item()
    shuffled = clip_scores(clip, list(images), list(texts[1:]) + [texts[0]]).mean().item()
    return {"clip_matched": matched, "clip_shuffled": shuffled, "clip_gap": matched - shuffled}


# ------------------------------------------------------------------------------------------------ backbones
def held_out_images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """The images of the first ``n`` held-out captioning samples (scenes of one and two shapes)."""
    return [render_scene(make_sample_spec("caption", SPLIT, i, seed).scenes[0], size) for i in range(n)]


def _to_model_range(images: Sequence[Image.Image], size: int, device: torch.device) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) in [-1, 1], the VQ-VAE's input range."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0


@torch.no_grad()
def vqvae_psnr(vqvae: Any, images: Sequence[Image.Image], batch_size: int = 32) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the VQ-VAE's reconstructions through its multi-scale codes."""
    device = next(vqvae.parameters()).device
    values = []
    for batch in batched(list(images), batch_size):
        x = _to_model_range(batch, vqvae.image_size, device).float()
        recon = vqvae.codes_to_img(vqvae.img_to_codes(x)).float().clamp(-1, 1)
        mse = (((recon + 1) / 2 - (x + 1) / 2) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        values += (10 * torch.log10(1 / mse)).tolist()
    return float(np.mean(values))


def world_classes() -> list[tuple[str, str]]:
    """(shape, colour) of each class label in the default class-conditional order: shape-major."""
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


@torch.no_grad()
def var_judge_accuracy(
    var: Any,
    vqvae: Any,
    classes: Sequence[tuple[str, str]] | None = None,
    per_class: int = 4,
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    seed: int = 0,
    batch_size: int = 32,
    judge: ShapesJudge | None = None,
) -> dict[str, float]:
    """Class-conditional VAR: ``per_class`` samples of every class (label = index in ``classes``), decoded by the
    VQ-VAE and judged on the class's colour and shape; accuracies in percent."""
    classes = list(classes or world_classes())
    judge = judge or get_judge(vqvae.image_size)
    labels = [label for label in range(len(classes)) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]  # sample i's own generator: figures independent of batch_size
    hits: dict[str, list[float]] = defaultdict(list)
    was_training = var.training
    var.eval()
    try:
        for batch, batch_seeds in zip(batched(labels, batch_size), batched(seeds, batch_size), strict=True):
            codes = var.sample(list(batch), cfg=cfg, top_k=top_k, top_p=top_p, seeds=batch_seeds, vqvae=vqvae)
            images = ((vqvae.codes_to_img(codes).float() + 1) / 2).clamp(0, 1).cpu()
            for label, image in zip(batch, images, strict=True):
                shape, colour = classes[label]
                for name, value in judge.judge(image, shape=shape, colour=colour).scores().items():
                    hits[name].append(value)
    finally:
        var.train(was_training)
    return {"n": float(len(labels)), **{name: _percent(values) for name, values in hits.items() if name != "count"}}


# ------------------------------------------------------------------------------------------------ all together
@dataclass
class ShapesEvalConfig:
    """What :func:`evaluate_shapes` runs (``conf/eval.yaml: shapes``)."""

    seed: int = 0  # the world's seed (data.shapes.seed): which held-out samples
    size: int = 64  # the world's image size (data.shapes.size): input images are rendered at it
    vqa: int = 200  # held-out questions (0 = skip understanding)
    t2i: int = 100  # held-out instructions (0 = skip generation)
    psnr: int = 200  # held-out images the VQ-VAE reconstructs (0 = skip)
    batch_size: int = 16
    vqa_max_new_tokens: int = 16
    t2i_max_new_tokens: int = 64  # the reply's text before (and after) its image
    force_image: bool = False  # start every reply with its image instead of letting the model write first
    judge_strict: bool = True  # refuse to judge when the judge fails its validation (else warn)
    judge_validation: int = 200  # ground-truth scenes the judge is validated on (x 7 degradations)

    @classmethod
    def coerce(cls, value: Any = None, **overrides: Any) -> ShapesEvalConfig:
        values = dict(value or {}) if not isinstance(value, ShapesEvalConfig) else dict(value.__dict__)
        values.update(overrides)
        return cls(**values)


def evaluate_shapes(
    model: Any,
    config: ShapesEvalConfig | Mapping[str, Any] | None = None,
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
    clip: Any = None,
) -> dict[str, float]:
    """Understanding and generation figures on the held-out split, in memory (see the module docstring).

    Keys: ``vqa/...`` (score_vqa), ``t2i/...`` (score_t2i, plus ``t2i/clip_*`` with a ``clip`` judge from
    ``vargpt.eval.clip_score.load_open_clip``), ``vqa/questions_per_s``, ``t2i/images_per_s``, and
    ``vqvae/psnr`` (the model's VQ-VAE on held-out images).
    """
    c = ShapesEvalConfig.coerce(config)
    figures: dict[str, float] = {}
    if c.psnr > 0:
        figures["vqvae/psnr"] = vqvae_psnr(model.vae_local, held_out_images(c.psnr, c.seed, c.size))
    if c.vqa > 0:
        start = time.perf_counter()
        items = vqa_items(c.vqa, c.seed, c.size)
        sampling_vqa = vqa_sampling(c.vqa_max_new_tokens)
        records = [r for batch in answer(model, items, CHAT_QUESTIONS, sampling_vqa, c.batch_size) for r in batch]
        figures.update({f"vqa/{k}": v for k, v in score_vqa(records).items()})
        figures["vqa/questions_per_s"] = len(records) / (time.perf_counter() - start)
    if c.t2i > 0:
        judge = ShapesJudge(model.cfg.vqvae.image_size, strict=c.judge_strict, n_validation=c.judge_validation)
        items = t2i_items(c.t2i, c.seed)
        cfg = SamplingConfig.coerce(sampling, max_new_tokens=c.t2i_max_new_tokens)
        start = time.perf_counter()
        drawn = [pair for batch in draw(model, items, cfg, c.batch_size, judge=judge, force_image=c.force_image)
                 for pair in batch]  # fmt: skip
        seconds = time.perf_counter() - start
        records = [record for record, _ in drawn]
        figures.update({f"t2i/{k}": v for k, v in score_t2i(records).items()})
        log.info("t2i positions, asked (rows) vs judged:\n%s", format_position_confusion(position_confusion(records)))
        figures["t2i/images_per_s"] = sum(r["has_image"] for r in records) / seconds
        if clip is not None:
            images = [image for _, image in drawn if image is not None]
            texts = [description(r["scene"], r["requested"]) for r, image in drawn if image is not None]
            figures.update({f"t2i/{k}": v for k, v in clip_figures(clip, images, texts).items()})
    return figures
