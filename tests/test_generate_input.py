"""Input images given as paths (``src/generate.py``, ``model.generate``): a file that is not an image fails at
once, naming the path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from fixtures.data import image_bytes
from hydra import compose, initialize_config_dir

from vargpt.config import register_configs

ROOT = Path(__file__).resolve().parents[1]


def generate_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "src" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("content", "error", "expected"),
    [
        (b"plain text, not pixels", ValueError, "not an image PIL can read"),
        (image_bytes("PNG")[:60], ValueError, "not an image PIL can read"),
        (None, FileNotFoundError, "no such file"),
    ],
    ids=["text", "truncated-png", "missing"],
)
def test_a_bad_input_image_fails_naming_the_path_before_the_model_loads(
    tmp_path, monkeypatch, content, error, expected
):
    path = tmp_path / "cat.png"
    if content is not None:
        path.write_bytes(content)
    cli = generate_cli()
    monkeypatch.setattr(cli, "load_model", lambda *_: pytest.fail("the model loaded before the image was checked"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[f"out_dir={tmp_path / 'out'}", f"image={path}"])
    with pytest.raises(error, match=f"^image={path}: {expected}"):
        cli.run(cfg)


def test_a_good_input_image_decodes_to_rgb(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes("PNG", size=(20, 10)))
    image = generate_cli().load_input_image(str(path))
    assert image.mode == "RGB" and image.size == (20, 10)


def test_the_cli_answers_about_a_good_input_image(tmp_path):
    import json

    path = tmp_path / "cat.png"
    path.write_bytes(image_bytes("PNG", size=(20, 10)))
    overrides = [
        f"out_dir={tmp_path / 'out'}",
        f"image={path}",
        "n=1",
        "sampling.max_new_tokens=2",
        "force_image=false",
    ]
    register_configs()  # generate_schema (the CLI module registers it too, but loads after composing here)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=overrides)
    manifest = json.loads(generate_cli().run(cfg).read_text())
    assert manifest["image"] == str(path) and manifest["prompt"].startswith("<image>\n")
    assert len(manifest["samples"]) == 1
