"""Text-to-image positions: the judge, the instructions and the generation targets agree on where objects are,
and the evaluation reports asked against judged cells with the chance level of its figures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vargpt.data.shapes import (
    _POSITION_PHRASES,
    JITTER,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    cell_center,
    render_scene,
)
from vargpt.data.transforms import var_transform
from vargpt.eval.image_analysis import analyse_image
from vargpt.eval.judge import judge_analysis
from vargpt.eval.shapes_eval import (
    NOT_DRAWN,
    format_position_confusion,
    position_confusion,
    position_figures,
    score_t2i,
    t2i_items,
)


def _at(cell: str, shape: str, size: str, dx: float = 0.0, dy: float = 0.0) -> ShapeObject:
    x, y = cell_center(cell)
    return ShapeObject(shape, "red", size, cell, x + dx, y + dy)


@pytest.mark.parametrize("cell", POSITIONS)
def test_judge_reads_every_cell_at_the_jitter_extremes(cell):
    """Every shape and size, centred anywhere the world may put it in ``cell``, is judged in ``cell``."""
    for shape, size, dx, dy in itertools.product(SHAPES, SIZES, (-JITTER, JITTER), (-JITTER, JITTER)):
        obj = _at(cell, shape, size, dx, dy)
        verdict = judge_analysis(analyse_image(render_scene(Scene("gray", (obj,)))), [obj], "gray", ["position"])
        assert verdict.position and verdict.matched[0].position == cell, (shape, size, dx, dy)


def test_held_out_instructions_name_the_judged_position():
    """The position words of every held-out instruction are the scene's (what the judge compares with), and the
    generation-target preprocessing leaves every object in its cell."""
    items = [item for item in t2i_items(120) if "position" in item.requested]
    target = var_transform(64, train=True, resize_ratio=1.0)
    assert len(items) == 64
    for item in items:
        scene = Scene.from_dict(item.scene)
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape} {_POSITION_PHRASES[obj.position]}" in item.prompt
        pixels = (target(render_scene(scene, 64)) + 1) / 2
        judged = judge_analysis(analyse_image(pixels), scene.objects, scene.background, item.requested)
        assert judged.position and [o.position for o in judged.matched] == [o.position for o in scene.objects]


def test_matched_follows_the_chosen_assignment():
    """Two asked objects drawn in swapped cells: each is matched to its own colour and shape, in the wrong cell."""
    a, b = _at("top left", "circle", "large"), ShapeObject("square", "blue", "large", "bottom right", 5 / 6, 5 / 6)
    drawn = Scene("white", (ShapeObject("circle", "red", "large", "bottom right", 5 / 6, 5 / 6),
                            ShapeObject("square", "blue", "large", "top left", 1 / 6, 1 / 6)))  # fmt: skip
    verdict = judge_analysis(analyse_image(render_scene(drawn)), [a, b], "white", ["position"])
    assert verdict.both and verdict.position is False
    assert [(o.colour, o.position) for o in verdict.matched] == [("red", "bottom right"), ("blue", "top left")]
    missing = judge_analysis(analyse_image(render_scene(Scene("white", drawn.objects[:1]))), [a, b], "white")
    assert missing.matched[1] is None


def _record(asked: list[tuple[str, str, str]], drawn: list[tuple[str, str, str] | None]) -> dict:
    objects = [{"colour": c, "shape": s, "position": p} for c, s, p in asked]
    matched = [None if d is None else {"colour": d[0], "shape": d[1], "size": "large", "position": d[2]} for d in drawn]
    hits = all(d is not None and d[2] == a[2] for a, d in zip(asked, drawn, strict=True))
    judged = {"has_image": 1.0, "colour": 1.0, "shape": 1.0, "both": 1.0, "count": 1.0, "position": float(hits)}
    return {"requested": ["shape", "colour", "position"], "scene": {"objects": objects}, "matched": matched, **judged}


def test_position_confusion_figures_and_table():
    records = [
        _record([("red", "circle", "top left")], [("red", "circle", "top left")]),
        _record([("red", "circle", "top left")], [("blue", "square", "center")]),
        _record([("red", "circle", "center")], [("red", "circle", "top left")]),
        _record([("red", "circle", "center"), ("blue", "square", "right")], [("red", "circle", "center"), None]),
        # An instruction without a position is left out of every position figure.
        {**_record([("red", "circle", "right")], [("red", "circle", "right")]), "requested": ["shape", "colour"]},
    ]
    del records[-1]["position"]
    confusion = position_confusion(records)
    assert confusion["top left"] == {**dict.fromkeys((*POSITIONS, NOT_DRAWN), 0), "top left": 1, "center": 1}
    assert confusion["center"]["top left"] == 1 and confusion["center"]["center"] == 1
    assert confusion["right"][NOT_DRAWN] == 1 and sum(map(sum, (r.values() for r in confusion.values()))) == 5
    # Asked: top left 2, center 2, right 1; judged: top left 2, center 2 (of 5 objects).
    figures = position_figures(records)
    assert figures == {
        "position_objects": 40.0,
        "position_chance": 100.0 * (2 * 2 + 2 * 2) / 25,
        "position_when_found": 100.0 * float(np.mean([True, False, True])),
        "position_when_found_n": 3.0,
    }
    assert score_t2i(records)["position"] == 25.0 and score_t2i(records)["position_chance"] == 32.0
    table = format_position_confusion(confusion).splitlines()
    assert len(table) == 10 and table[1].split()[:4] == ["top", "left", "1", "0"]
    assert position_figures([{k: v for k, v in r.items() if k != "matched"} for r in records]) == {}
