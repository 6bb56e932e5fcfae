"""What the training shell (task.py) asks of a kind of stage, and the registry the kinds put themselves in.

The shell is model-agnostic: it composes and validates the config, seeds, finds the resume point and the
start, builds the data and the tracking logger, marks a failed run failed, and maps SIGTERM to its exit status.
The model, its callbacks, its export and what a rerun of a complete run writes are the app's. The VARGPT stages
(vargpt.training.vargpt_app) and the stage-0 recipes (vargpt.backbones.app) each register an :class:`App`
under the key of the stages they train (:func:`app_key`); the entry point (``src/train.py``) imports both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from vargpt.training.checkpointing import ResumePoint, StageRun

# The key of the stages without ``stage.recipe``.
VARGPT_KEY = "vargpt"


@dataclass(frozen=True)
class RunContext:
    """Everything the shell resolved before the app takes over."""

    # The composed, resolved root config: apps hand its sections on, never the root.
    cfg: DictConfig
    run: StageRun
    tokenizer: Any
    # The VARGPT data module of ``cfg.data`` (built for every stage: the shell checks the data before any model).
    datamodule: Any
    # Where a resumed run continues (None: a fresh run).
    resume: ResumePoint | None
    # The checkpoint a fresh run starts from (stage.init_from resolved; None: as the model config builds it).
    init_path: str | None
    # The stage's length in optimizer steps.
    max_steps: int
    # The command line's overrides (the run state records the command that continues the run).
    overrides: list[str]
    # Whether the tracker starts a new run (not continuing a saved MLflow run id): it then records the params.
    new_run: bool

    @property
    def complete(self) -> bool:
        """Whether the resume checkpoint is already at the stage's last step (a rerun trains nothing)."""
        return self.resume is not None and self.resume.global_step >= self.max_steps


@dataclass(frozen=True)
class App:
    """A kind of stage, as the shell drives it (every hook but ``prepare`` runs after the run is tracked).

    * ``prepare(ctx)``: what must exist before tracking starts (the VARGPT model with its start weights); what it
      returns is handed to the other hooks.
    * ``fit(ctx, prepared, logger)``: train, export, write the stage record; the final metrics. Raises
      ``checkpointing.PreemptedError`` when SIGTERM stopped it.
    * ``finish(ctx, prepared, logger, missing)``: a rerun of a complete run writes what an interrupted end left
      out (``missing``: "export", "stage record", "summary"); called on every rank.
    * ``exports(ctx)``: whether the stage exports a product (else "export" is never missing).
    * ``redone``: what ``finish`` does again whatever is missing (said in the rerun's message).
    """

    name: str
    prepare: Callable[[RunContext], Any]
    fit: Callable[[RunContext, Any, Any], dict[str, float]]
    finish: Callable[[RunContext, Any, Any, list[str]], dict[str, float]]
    exports: Callable[[RunContext], bool]
    redone: tuple[str, ...] = ()


_APPS: dict[str, App] = {}


def register_app(keys: Iterable[str], app: App) -> None:
    """Make ``app`` train the stages of ``keys`` (``VARGPT_KEY``, or ``stage.recipe.kind`` values)."""
    for key in keys:
        _APPS[key] = app


def app_key(stage: DictConfig) -> str:
    """The registry key of a stage: its recipe kind, or ``VARGPT_KEY`` for a stage without a recipe."""
    return VARGPT_KEY if stage.recipe is None else str(stage.recipe.kind.value)


def app_for(stage: DictConfig) -> App:
    """The registered app of ``stage``; names the module that registers it when none did."""
    key = app_key(stage)
    if key not in _APPS:
        where = "vargpt.training.vargpt_app" if key == VARGPT_KEY else "vargpt.backbones.app"
        raise KeyError(
            f"stage {stage.name}: no training app registered for {key!r} (registered: {sorted(_APPS)}); "
            f"import {where} before training (src/train.py imports every app)"
        )
    return _APPS[key]
