"""The training shell with an app of its own: whatever a stage trains, a run that raises is marked failed once,
by the shell, and the app sees only what the shell resolved for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_run import base_overrides, compose_train, data_dir  # noqa: F401 (fixture)

from vargpt.training import app as app_module
from vargpt.training import checkpointing as ckpt
from vargpt.training.app import VARGPT_KEY, App, RunContext
from vargpt.training.task import train


def test_a_failing_app_leaves_a_failed_run_state(data_dir, tmp_path, monkeypatch):  # noqa: F811
    seen: list[RunContext] = []

    def fit(ctx: RunContext, prepared: str, logger: object) -> dict[str, float]:
        seen.append(ctx)
        ckpt.start_attempt(ctx.run, ctx.overrides, 0, ctx.max_steps)
        raise RuntimeError(f"app failed after {prepared}")

    failing = App("failing", lambda ctx: "prepare", fit, finish=lambda *_: {}, exports=lambda ctx: True)
    monkeypatch.setattr(app_module, "_APPS", {VARGPT_KEY: failing})
    cfg = compose_train(["stage=pretrain", "logger=none", *base_overrides(data_dir, tmp_path / "logs")])
    with pytest.raises(RuntimeError, match="app failed after prepare"):
        train(cfg)
    (ctx,) = seen
    run_dir = Path(cfg.paths.run_dir).resolve()
    assert ctx.run == ckpt.StageRun("pretrain", cfg.run_name, Path(cfg.paths.log_dir), run_dir)
    assert ctx.resume is None and ctx.max_steps == 2 and not ctx.complete and ctx.new_run
    assert json.loads((run_dir / ckpt.RUN_STATE).read_text())["state"] == "failed"
