"""The shapes judge: validated on the world's own renders (clean and degraded), and it catches wrong images."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.data.shapes import COLOURS, SHAPES, Scene, ShapeObject, render_scene, sample_scene
from vargpt.eval.image_analysis import analyse_image, connected_components
from vargpt.eval.judge import (
    DEGRADATIONS,
    JudgeValidationError,
    ShapesJudge,
    degrade,
    validate_judge,
    validation_report,
)


def one(shape: str, colour: str, size: str = "large", position: str = "center", background: str = "white") -> Scene:
    x, y = {"center": (0.5, 0.5), "top left": (1 / 6, 1 / 6), "bottom right": (5 / 6, 5 / 6)}[position]
    return Scene(background, (ShapeObject(shape, colour, size, position, x, y),))


def test_validation_on_ground_truth_at_64px():
    """>= 98 % of the world's renders judged right (colour and shape), clean and under every degradation."""
    report = validation_report(n=100, size=64)
    assert report["n_images"] == 100 * len(DEGRADATIONS)
    assert report["accuracy"] >= 0.98, report
    assert report["clean/accuracy"] == 1.0
    for attribute in ("colour", "background", "position", "size"):
        assert report[attribute] >= 0.99, (attribute, report)
    assert validate_judge(n=20, size=64, seed=1, degraded=False) == 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", list(COLOURS))
def test_every_shape_and_colour_on_every_background(shape, colour):
    for background in ("white", "black", "gray"):
        for size in ("small", "large"):
            scene = one(shape, colour, size, "top left", background)
            (found,) = analyse_image(render_scene(scene, 64)).objects
            assert (found.shape, found.colour, found.size, found.position) == (shape, colour, size, "top left")


def test_wrong_colour_and_shape_are_detected():
    judge = ShapesJudge(size=64, n_validation=50)
    image = render_scene(one("circle", "red"), 64)
    assert judge.judge(image, one("circle", "red")).both
    wrong_colour = judge.judge(image, one("circle", "blue"))
    assert not wrong_colour.colour and wrong_colour.shape and not wrong_colour.both
    wrong_shape = judge.judge(image, one("square", "red"))
    assert wrong_shape.colour and not wrong_shape.shape and not wrong_shape.both
    assert not judge.judge(image, shape="triangle").both and judge.judge(image, colour="red").both
    # Requested extras are judged only when asked; position and background can be wrong too.
    verdict = judge.judge(image, one("circle", "red", position="top left", background="black"),
                          ["shape", "colour", "position", "background"])  # fmt: skip
    assert verdict.both and verdict.position is False and verdict.background is False and verdict.size is None
    # An empty canvas has no object: nothing is right.
    blank = judge.judge(Image.new("RGB", (64, 64), (245, 245, 245)), one("circle", "red"))
    assert not (blank.colour or blank.shape or blank.count)
    with pytest.raises(ValueError, match="unknown shape"):
        judge.judge(image, shape="star")


def test_two_object_scenes_and_clutter():
    judge = ShapesJudge(size=64, n_validation=50)
    rng = random.Random(3)
    for _ in range(20):
        scene = sample_scene(rng, 2)
        image = render_scene(scene, 64)
        assert judge.judge(image, scene).both
        a, b = scene.objects
        swapped = Scene(scene.background, (ShapeObject(b.shape, a.colour, a.size, a.position, a.x, a.y),
                                           ShapeObject(a.shape, b.colour, b.size, b.position, b.x, b.y)))  # fmt: skip
        assert not judge.judge(image, swapped).both  # colours on the wrong shapes
    # One object asked: the dominant one is judged, a small extra blob does not make a wrong image pass.
    big_red_circle = Scene("white", (ShapeObject("circle", "red", "large", "center", 0.5, 0.5),
                                     ShapeObject("square", "blue", "small", "top left", 0.17, 0.17)))  # fmt: skip
    verdict = judge.judge(render_scene(big_red_circle, 64), one("square", "blue"))
    assert not verdict.both and not verdict.count


def test_inputs_tensors_arrays_and_sizes():
    scene = one("triangle", "green", background="gray")
    image = render_scene(scene, 64)
    as_float = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    as_uint8 = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
    for value in (image, as_float, as_uint8, np.asarray(image), render_scene(scene, 256)):
        (found,) = analyse_image(value).objects
        assert (found.shape, found.colour) == ("triangle", "green")
    for kind in DEGRADATIONS:
        assert analyse_image(degrade(image, kind, random.Random(0))).objects[0].shape == "triangle", kind
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[4, 4] = mask[4, 5] = True
    assert sorted(int(c.sum()) for c in connected_components(mask)) == [2, 2]


def test_an_unreliable_judge_refuses():
    """At 24 px the world's small shapes are a few pixels wide: validation fails, and the judge says so."""
    with pytest.raises(JudgeValidationError, match="cannot be trusted"):
        ShapesJudge(size=24, n_validation=30)
    with pytest.warns(UserWarning, match="cannot be trusted"):
        judge = ShapesJudge(size=24, n_validation=30, strict=False)
    assert not judge.trusted


def test_backbone_helpers_on_random_models():
    """VQ-VAE reconstruction PSNR and the class-conditional VAR's judge accuracy run end to end (random weights:
    the figures are meaningless, their ranges are not)."""
    from vargpt.eval.shapes_eval import held_out_images, var_judge_accuracy, vqvae_psnr, world_classes
    from vargpt.model import build_var, build_vqvae

    # A small VQ-VAE and VAR of the world's size (64 px, 8x8 latent), independent of the tiny config's choices.
    patch_nums = (1, 2, 3, 4, 6, 8)
    torch.manual_seed(0)
    vqvae = build_vqvae(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), patch_nums=patch_nums).eval()
    images = held_out_images(2)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert 0 < vqvae_psnr(vqvae, images) < 60
    var = build_var(depth=2, vocab_size=64, z_channels=8, num_classes=18, patch_nums=patch_nums)
    var.bind_vqvae(vqvae)
    classes = world_classes()
    assert len(classes) == 18 and classes[0] == ("circle", "red")
    judge = ShapesJudge(64, n_validation=50)
    figures = var_judge_accuracy(var, vqvae, classes[:4], per_class=1, top_k=1, top_p=0.0, judge=judge)
    assert figures["n"] == 4 and set(figures) == {"n", "colour", "shape", "both"}
    assert all(0 <= figures[k] <= 100 for k in ("colour", "shape", "both"))


def test_t2i_scores_separate_the_reply_from_the_image():
    """reply_objects: replies naming every asked object; both_when_reply_right: the judge over those only."""
    from vargpt.eval.core import reply_names_objects
    from vargpt.eval.shapes_eval import score_t2i

    scene = {
        "background": "white",
        "objects": [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}],
    }
    assert reply_names_objects("Here is a red circle and a blue square.<image_gen>", scene)
    assert not reply_names_objects("Here is a blue circle and a red square.<image_gen>", scene)  # colours swapped
    base = {"has_image": 1.0, "colour": 1.0, "shape": 1.0, "count": 1.0}
    records = [
        {**base, "both": 1.0, "reply_objects": 1.0},
        {**base, "both": 0.0, "reply_objects": 1.0},
        {**base, "both": 0.0, "reply_objects": 0.0},
        {**base, "both": 1.0, "reply_objects": 0.0},
    ]
    scores = score_t2i(records)
    assert scores["reply_objects"] == 50.0 and scores["both_when_reply_right"] == 50.0 and scores["both"] == 50.0
    assert "reply_objects" not in score_t2i([{k: v for k, v in r.items() if k != "reply_objects"} for r in records])
