"""The whole demo (`make demo`: stages 1-3 from the committed backbones, then the shapes evaluation).

Slow (about 9 minutes on 2 idle cores): run with ``pytest -m slow tests/test_demo.py``. It asserts issue 8's
VQ-VAE target (>= 30 dB) and the figures this commit's backbones reach for the rest (docs/backbones.md), not
issue 8's other targets (VQA >= 90 %, text-to-image both right >= 70 %), which these backbones do not reach;
raise the bounds as the backbones improve.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_runs_and_reaches_this_commits_figures(tmp_path):
    log_dir = tmp_path / "logs"
    subprocess.run(["make", "demo", f"LOG_DIR={log_dir}"], cwd=REPO, check=True)
    scores = json.loads(next((log_dir / "eval").glob("*/shapes/scores.json")).read_text())
    assert scores["vqa/n"] == 200 and scores["t2i/n"] == 100
    # Measured at this commit: VQA 65.5 % (chance ~25 %), text-to-image both right 7 % (chance ~6 %), an image
    # started for 81 % of the instructions, VQ-VAE 31.9 dB on held-out renders, CLIP score matched 42.3 vs
    # shuffled 17.3. Release-exact prompts and the frozen stage-2 projector moved VQA up and the text-to-image
    # figures down (12 % and 99 % before); the committed backbones were trained with the old prompt layout
    # (docs/backbones.md, "Release-exact prompts").
    assert scores["vqa/accuracy"] >= 60.0
    assert scores["t2i/both"] >= 5.0
    assert scores["t2i/image_rate"] >= 75.0
    assert scores["vqvae/psnr"] >= 30.0
    assert scores["t2i/clip_matched"] > scores["t2i/clip_shuffled"]
    assert scores["judge/validation_accuracy"] >= 98.0
    for stage in ("pretrain", "sft_mixed", "sft_gen"):
        assert (log_dir / "stages" / f"{stage}.json").is_file()
