"""The ``trainer.compile`` switch: off by default (bad values: tests/test_train_config.py); with it on, training
steps of the tiny model give the eager losses (slow: torch.compile builds C++ kernels on a CPU, about a minute)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_train_config import compose_cfg
from test_train_run import base_overrides, csv_losses, data_dir, run  # noqa: F401  (the shapes world fixture)

from vargpt.training.lightning_module import compile_blocks


def test_compile_is_off_by_default_and_takes_torch_modes():
    assert compose_cfg().trainer.compile.enabled is False
    for trainer in ("cpu", "gpu", "fsdp"):
        assert compose_cfg(f"trainer={trainer}").trainer.compile.enabled is False
    cfg = compose_cfg("trainer.compile.enabled=true", "trainer.compile.mode=max-autotune-no-cudagraphs")
    assert cfg.trainer.compile.mode.value == "max-autotune-no-cudagraphs"


def test_compile_blocks_keeps_names():
    blocks = [torch.nn.Linear(4, 4) for _ in range(2)]
    before = [dict(b.named_parameters()) for b in blocks]
    compile_blocks(blocks, "default")
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert [dict(b.named_parameters()) for b in blocks] == before


def _cpp_compiler() -> str | None:
    """What inductor builds its CPU kernels with (``CXX``, else g++ / c++ / clang++)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.mark.slow
@pytest.mark.skipif(_cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler (none found)")
def test_compiled_training_matches_eager(data_dir, tmp_path):  # noqa: F811
    """Two optimizer steps of stage 2 (trained LLM; vision tower and VAR blocks frozen, on and off the gradient
    path), activation checkpointing on, compiled and eager: the same losses within float tolerance."""
    common = ["stage=sft_mixed", "stage.init_from=null", "logger=csv", "trainer.activation_checkpointing=true"]
    losses = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        torch._dynamo.reset()
        cfg, _ = run([*common, *base_overrides(data_dir, tmp_path / name), f"trainer.compile.enabled={compiled}"])
        losses[name] = csv_losses(Path(cfg.paths.run_dir))
    assert len(losses["eager"]) == 2 and losses["eager"].keys() == losses["compiled"].keys()
    for step, loss in losses["eager"].items():
        assert losses["compiled"][step] == pytest.approx(loss, rel=1e-4), step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
