"""How the training shell finds the app of a stage (the package graph is checked in test_architecture.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vargpt.recipe_config import RecipeConfig, RecipeKind
from vargpt.training import app as app_module
from vargpt.training.app import VARGPT_KEY, app_for, app_key


def test_app_key_and_an_unregistered_app_names_its_module(monkeypatch):
    vargpt_stage = OmegaConf.create({"name": "pretrain", "recipe": None})
    recipe_stage = OmegaConf.structured({"name": "world_lm", "recipe": RecipeConfig(kind=RecipeKind.text_lm)})
    assert app_key(vargpt_stage) == VARGPT_KEY and app_key(recipe_stage) == "text_lm"
    monkeypatch.setattr(app_module, "_APPS", {})  # as if no app module were imported
    with pytest.raises(KeyError, match=r"world_lm: no training app registered for 'text_lm'.*vargpt.backbones.app"):
        app_for(recipe_stage)
    with pytest.raises(
        KeyError, match=r"pretrain: no training app registered for 'vargpt'.*vargpt.training.vargpt_app"
    ):
        app_for(vargpt_stage)
