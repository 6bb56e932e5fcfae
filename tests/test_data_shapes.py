"""The shapes world: determinism, rendering, tasks, held-out splits, building on demand (vargpt.data.shapes)."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures.data import WORLD_TRAIN, WORLD_VAL, tiny_world

from vargpt.data.records import check_record
from vargpt.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_COMBOS,
    POSITIONS,
    SHAPES,
    SIZES,
    TASKS,
    Scene,
    ShapeObject,
    cell_center,
    ensure_shapes_world,
    make_sample_spec,
    png_bytes,
    position_of,
    render_scene,
    split_counts,
)
from vargpt.data.shards import verify_source


def test_vocabulary_size():
    assert len(SHAPES) >= 3 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 1 and len(POSITIONS) == 9
    assert not set(COLOURS.values()) & set(BACKGROUNDS.values())


def test_samples_are_pure_functions_of_their_arguments():
    for task in TASKS:
        a, b = make_sample_spec(task, "val", 7, 3), make_sample_spec(task, "val", 7, 3)
        assert a == b and a != make_sample_spec(task, "val", 8, 3)
        assert [png_bytes(render_scene(s)) for s in a.scenes] == [png_bytes(render_scene(s)) for s in b.scenes]


def test_render_shows_the_attributes():
    scene = Scene("white", (ShapeObject("circle", "red", "large", "top left", *cell_center("top left")),))
    img = render_scene(scene, 64)
    assert img.size == (64, 64) and img.mode == "RGB"
    cx, cy = (round(v * 64) for v in cell_center("top left"))
    assert img.getpixel((cx, cy)) == COLOURS["red"]
    assert img.getpixel((63, 63)) == BACKGROUNDS["white"]
    assert position_of(*cell_center("bottom right")) == "bottom right"
    triangle = render_scene(Scene("black", (ShapeObject("triangle", "blue", "large", "center", 0.5, 0.5),)), 64)
    # Pointing up: the apex row is narrow, the base row wide.
    top, base = (sum(triangle.getpixel((x, y)) == COLOURS["blue"] for x in range(64)) for y in (25, 39))
    assert 0 < top < base
    assert render_scene(scene.to_dict(), 32).size == (32, 32)


def test_every_task_makes_valid_records_with_aligned_ground_truth():
    for task in TASKS:
        for i in range(50):
            spec = make_sample_spec(task, "train", i, 0)
            kinds = check_record(spec.messages, len(spec.scenes))
            assert len(spec.meta["attributes"]) == len(spec.meta["requested"]) == len(kinds)
            for kind, requested in zip(kinds, spec.meta["requested"], strict=True):
                assert (requested is None) == (kind == "image")
            assert Scene.from_dict(spec.meta["attributes"][0]) == spec.scenes[0]
            for obj in (o for s in spec.scenes for o in s.objects):
                assert position_of(obj.x, obj.y) == obj.position and obj.size in SIZES
    t2i = make_sample_spec("t2i", "train", 0, 0)
    assert t2i.messages[1]["content"].endswith("<image_gen>") and t2i.messages[1]["content"].startswith(
        ("Here is", "Sure!", "I have drawn")
    )
    vqa = make_sample_spec("vqa", "train", 0, 0)
    assert vqa.messages[1]["content"] == vqa.meta["answer"]


def test_held_out_combinations_and_wordings():
    def combos_in_text(text: str) -> set[tuple[str, str]]:
        return {(s, c) for s, c in HELD_OUT_COMBOS if f"{c} {s}" in text}

    for task in TASKS:
        for i in range(200):
            spec = make_sample_spec(task, "train", i, 0)
            assert not spec.meta["unseen_combo"] and not spec.meta["unseen_wording"]
            assert not any((o.shape, o.colour) in HELD_OUT_COMBOS for s in spec.scenes for o in s.objects)
            assert not combos_in_text(json.dumps(spec.messages))
    val = [make_sample_spec(t, "val", i, 0).meta for t in TASKS for i in range(200)]
    unseen_combo = sum(m["unseen_combo"] for m in val) / len(val)
    unseen_wording = sum(m["unseen_wording"] for m in val) / len(val)
    assert 0.4 < unseen_combo < 0.65 and 0.4 < unseen_wording < 0.6


def test_split_counts_sum_exactly():
    for total in (0, 1, 7, 120, 20000):
        counts = split_counts(total)
        assert sum(counts.values()) == total and set(counts) == set(TASKS)


def test_world_on_disk_and_ensure(caplog):
    world = tiny_world()
    manifest = json.loads((world / "manifest.json").read_text())
    assert sum(s["num_samples"] for k, s in manifest["sources"].items() if k.startswith("train")) == WORLD_TRAIN
    assert sum(s["num_samples"] for k, s in manifest["sources"].items() if k.startswith("val")) == WORLD_VAL
    assert verify_source(world / "val" / "mixed").ok
    assert ensure_shapes_world(world, 64, WORLD_TRAIN, WORLD_VAL, 0) == world / "manifest.json"
    with pytest.raises(ValueError, match="built with"):
        ensure_shapes_world(world, 32, WORLD_TRAIN, WORLD_VAL, 0)


def test_ensure_builds_a_missing_world_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vargpt.data.shapes"):
        path = ensure_shapes_world(tmp_path / "w", size=32, train=20, val=8, seed=1)
    assert path.is_file() and "building" in caplog.text
    assert (tmp_path / "w" / "tokenizer" / "tokenizer.json").is_file()


def test_ensure_started_together_builds_the_world_once(tmp_path, caplog):
    """Two callers at once (ranks, recipes side by side): one builds under the lock, the other finds it built."""
    with caplog.at_level(logging.INFO, logger="vargpt.data.shapes"), ThreadPoolExecutor(2) as pool:
        paths = list(
            pool.map(lambda _: ensure_shapes_world(tmp_path / "w", size=32, train=20, val=8, seed=1), range(2))
        )
    assert paths[0] == paths[1] and paths[0].is_file()
    assert caplog.text.count("is missing: building it") == 1
    assert verify_source(tmp_path / "w" / "train" / "vqa").ok
