"""The shapes world's programmatic judge: does a (generated) image show the asked colour and shape?

No learned model is involved, so the judge cannot share a blind spot with the model it grades. An image is
analysed by :func:`vargpt.eval.image_analysis.analyse_image` (its docstring has the four steps).

Before it judges anything, a :class:`ShapesJudge` validates itself on the world's own ground-truth renders
(``render_scene``), clean and degraded like a VQ-VAE reconstruction would be (Gaussian blur, down-up
resampling, JPEG, noise, colour shift and a mix), one- and two-object scenes: :func:`validate_judge`. Below
``min_accuracy`` (98 %) it refuses (raises :class:`JudgeValidationError`) or, with ``strict=False``, warns.

Matching asked objects to detected ones: for ``k`` asked objects, the ``k`` largest detected objects are
assigned to them (the assignment maximising the number of matching attributes); one asked object is judged
on the dominant object only, so clutter cannot make a wrong image pass. ``count`` (as many significant objects
as asked) is reported separately.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from vargpt.data.shapes import (
    COLOURS,
    SHAPES,
    Scene,
    ShapeObject,
    render_scene,
    sample_scene,
)
from vargpt.eval.image_analysis import Analysis, DetectedObject, analyse_image

log = logging.getLogger(__name__)

MIN_ACCURACY = 0.98
DEGRADATIONS: tuple[str, ...] = ("clean", "blur", "resample", "jpeg", "noise", "colour_shift", "mixed")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position", "background")


class JudgeValidationError(RuntimeError):
    """The judge failed its validation on ground-truth images: its verdicts would not be trustworthy."""


# ------------------------------------------------------------------------------------------------ verdicts
@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one image.

    ``colour`` / ``shape`` / ``both``: every asked object has its colour / its shape / both (the headline
    figures). ``size``, ``position``, ``background``: only when asked (None otherwise). ``count``: as many
    significant objects as asked (reported, never part of ``both``). ``matched``: per asked object, the detected
    object it was judged on (None when the image has fewer objects than asked), so a report can say where the
    drawn object is, not only whether it is right.
    """

    colour: bool
    shape: bool
    both: bool
    count: bool
    size: bool | None = None
    position: bool | None = None
    background: bool | None = None
    analysis: Analysis | None = field(default=None, compare=False, repr=False)
    matched: tuple[DetectedObject | None, ...] = field(default=(), compare=False, repr=False)

    def scores(self) -> dict[str, float]:
        """``{attribute: 0.0 or 1.0}`` for every attribute judged (those not asked are left out)."""
        names = ("colour", "shape", "both", "count", "size", "position", "background")
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}


def _object_dict(obj: ShapeObject | Mapping[str, Any]) -> dict[str, Any]:
    return asdict(obj) if isinstance(obj, ShapeObject) else dict(obj)


def judge_analysis(
    analysis: Analysis,
    asked: Sequence[ShapeObject | Mapping[str, Any]],
    background: str | None = None,
    requested: Sequence[str] = ("shape", "colour"),
) -> Verdict:
    """Compare an :class:`Analysis` with the asked objects (``ShapeObject`` s or dicts with ``shape``,
    ``colour`` and, when requested, ``size`` / ``position``; a missing or None value is not checked).

    The ``k`` largest detected objects are assigned to the ``k`` asked ones, choosing the assignment with the
    most objects right in both colour and shape, then the most attributes right.
    """
    wanted = [_object_dict(obj) for obj in asked]
    if not wanted:
        raise ValueError("judge: no object asked")
    checked = ["colour", "shape"] + [a for a in ("size", "position") if a in requested]
    found = analysis.objects[: len(wanted)]
    best: list[dict[str, bool]] = [dict.fromkeys(checked, False) for _ in wanted]
    best_key, best_assignment = (-1, -1), ()
    for assignment in itertools.permutations(range(len(wanted)), len(found)):
        hits = [dict.fromkeys(checked, False) for _ in wanted]
        for detected, target in zip(found, assignment, strict=True):
            for name in checked:
                value = wanted[target].get(name)
                hits[target][name] = value is None or getattr(detected, name) == value
        key = (sum(h["colour"] and h["shape"] for h in hits), sum(sum(h.values()) for h in hits))
        if key > best_key:
            best, best_key, best_assignment = hits, key, assignment
    matched: list[DetectedObject | None] = [None] * len(wanted)
    for detected, target in zip(found, best_assignment, strict=True):
        matched[target] = detected
    return Verdict(
        colour=all(h["colour"] for h in best),
        shape=all(h["shape"] for h in best),
        both=all(h["colour"] and h["shape"] for h in best),
        count=len(analysis.objects) == len(wanted),
        size=all(h["size"] for h in best) if "size" in requested else None,
        position=all(h["position"] for h in best) if "position" in requested else None,
        background=analysis.background == background if "background" in requested and background else None,
        analysis=analysis,
        matched=tuple(matched),
    )


# ------------------------------------------------------------------------------------------------ validation
def degrade(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """A ground-truth render made to look like a reconstruction: one of :data:`DEGRADATIONS`."""
    if kind == "clean":
        return image
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    if kind == "resample":  # the softness of a decoder working at a lower resolution
        side = image.size[0]
        small = max(8, round(side * rng.uniform(0.4, 0.6)))
        return image.resize((small, small), Image.BILINEAR).resize(image.size, Image.BILINEAR)
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(50, 90))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    if kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(4, 10), array.shape)
        return Image.fromarray(np.clip(array + noise, 0, 255).round().astype(np.uint8))
    if kind == "colour_shift":
        shift = np.array([rng.uniform(-15, 15) for _ in range(3)], dtype=np.float32)
        return Image.fromarray(np.clip(array + shift, 0, 255).round().astype(np.uint8))
    if kind == "mixed":
        for step in ("blur", "colour_shift", "noise", "jpeg"):
            image = degrade(image, step, rng)
        return image
    raise ValueError(f"unknown degradation {kind!r}; known: {DEGRADATIONS}")


def validation_report(
    n: int = 200, size: int = 64, seed: int = 0, degradations: Sequence[str] = DEGRADATIONS, two_objects: float = 0.3
) -> dict[str, float]:
    """The judge's accuracy on ``n`` ground-truth scenes (a fraction ``two_objects`` with two objects), each
    rendered at ``size`` px and judged under every degradation (all attributes asked).

    Returns fractions: ``accuracy`` (colour and shape both right, over all scenes and degradations),
    ``<degradation>/accuracy``, and per attribute ``colour``, ``shape``, ``size``, ``position``,
    ``background``, ``count``; plus ``n_images``.
    """
    rng = random.Random(f"judge-validation:{seed}")
    totals: dict[str, list[float]] = {}
    for _ in range(n):
        scene = sample_scene(rng, 2 if rng.random() < two_objects else 1, unseen_combo=rng.random() < 0.2)
        clean = render_scene(scene, size)
        for kind in degradations:
            verdict = judge_analysis(analyse_image(degrade(clean, kind, rng)), scene.objects, scene.background,
                                     ATTRIBUTES)  # fmt: skip
            totals.setdefault(f"{kind}/accuracy", []).append(float(verdict.both))
            for name, value in verdict.scores().items():
                totals.setdefault(name, []).append(value)
    report = {name: float(np.mean(values)) for name, values in totals.items() if name != "both"}
    report["accuracy"] = float(np.mean(totals["both"]))
    report["n_images"] = float(len(totals["both"]))
    return report


def validate_judge(n: int = 200, size: int = 64, seed: int = 0, degraded: bool = True) -> float:
    """Accuracy (fraction with colour and shape both right) of the judge on the world's ground-truth images at
    ``size`` px: clean renders and, with ``degraded``, blurred / resampled / JPEG / noisy / colour-shifted ones."""
    return validation_report(n, size, seed, DEGRADATIONS if degraded else ("clean",))["accuracy"]


@lru_cache(maxsize=16)
def _cached_report(n: int, size: int, seed: int) -> tuple[tuple[str, float], ...]:
    return tuple(validation_report(n, size, seed).items())


class ShapesJudge:
    """The judge for images of ``size`` px, validated on construction by :func:`validation_report` (cached per
    process): below ``min_accuracy`` it raises :class:`JudgeValidationError` (``strict=False``: warns)."""

    def __init__(
        self, size: int = 64, min_accuracy: float = MIN_ACCURACY, strict: bool = True, n_validation: int = 200
    ) -> None:
        self.size = size
        self.report = dict(_cached_report(n_validation, size, 0))
        self.validation_accuracy = self.report["accuracy"]
        self.trusted = self.validation_accuracy >= min_accuracy
        if not self.trusted:
            message = (
                f"the shapes judge is right on {100 * self.validation_accuracy:.1f} % of ground-truth images at "
                f"{size} px, below the {100 * min_accuracy:.0f} % it needs: its verdicts cannot be trusted at this "
                f"size (validation: {self.report})"
            )
            if strict:
                raise JudgeValidationError(message)
            warnings.warn(message, stacklevel=2)
        log.info("shapes judge: %.1f %% right on ground truth at %d px", 100 * self.validation_accuracy, size)

    def judge(
        self,
        image: Any,
        scene: Scene | Mapping[str, Any] | None = None,
        requested: Sequence[str] = ("shape", "colour"),
        *,
        shape: str | None = None,
        colour: str | None = None,
    ) -> Verdict:
        """Judge one image against the asked scene (a ``Scene``, or a sample's ``meta["attributes"][i]``) and the
        attributes its instruction asked for (``meta["requested"][i]``), or against one ``shape`` and/or
        ``colour`` (a class-conditional sample; an attribute not given counts as right)."""
        if scene is None:
            if shape is None and colour is None:
                raise ValueError("judge: pass the asked scene, or a shape and/or a colour")
            if shape is not None and shape not in SHAPES:
                raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
            if colour is not None and colour not in COLOURS:
                raise ValueError(f"unknown colour {colour!r}; known: {tuple(COLOURS)}")
            return judge_analysis(analyse_image(image), [{"shape": shape, "colour": colour}])
        scene = Scene.from_dict(dict(scene)) if isinstance(scene, Mapping) else scene
        return judge_analysis(analyse_image(image), scene.objects, scene.background, requested)


@lru_cache(maxsize=8)
def get_judge(size: int = 64, strict: bool = True) -> ShapesJudge:
    """The validated judge for images of ``size`` px (built and validated once per process)."""
    return ShapesJudge(size=size, strict=strict)
