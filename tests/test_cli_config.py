"""The typed schemas of ``conf/eval.yaml`` and ``conf/generate.yaml`` (``vargpt.cli_config``): a misspelt key and a
bad value fail naming what is allowed, on the command line (before Hydra) and at compose time."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from vargpt.cli_config import NON_SCHEMA_GROUPS, Dtype, EvalConfig, GenerateConfig
from vargpt.config import refuse_extra_keys, register_configs, unknown_override_key

CONF = Path(__file__).resolve().parents[1] / "conf"
APPS = [("eval", EvalConfig), ("generate", GenerateConfig)]


def compose_app(name: str, overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize(("name", "schema"), APPS, ids=[name for name, _ in APPS])
def test_a_misspelt_top_level_key_names_the_keys_that_exist(name, schema):
    message = unknown_override_key(["device=cpu", "dtpye=float32"], schema, NON_SCHEMA_GROUPS)
    assert message == f"unknown key 'dtpye': {schema.__name__} has {sorted(f.name for f in fields(schema))}"
    with pytest.raises(ConfigCompositionException) as failure:
        compose_app(name, ["dtpye=float32"])
    assert f"Key 'dtpye' not in '{schema.__name__}'" in str(failure.value.__cause__)


@pytest.mark.parametrize(("name", "schema"), APPS, ids=[name for name, _ in APPS])
def test_a_misspelt_sampling_key_names_the_sampling_keys(name, schema):
    message = unknown_override_key(["sampling.tpo_k=1"], schema, NON_SCHEMA_GROUPS)
    assert message is not None and message.startswith("unknown key 'sampling.tpo_k': sampling has [")
    assert "'top_k'" in message


@pytest.mark.parametrize(("name", "schema"), APPS, ids=[name for name, _ in APPS])
def test_hydra_and_group_overrides_are_not_taken_for_misspelt_keys(name, schema):
    assert (
        unknown_override_key(["hydra.run.dir=/tmp/x", "sampling=greedy", "model=tiny"], schema, NON_SCHEMA_GROUPS)
        is None
    )


@pytest.mark.parametrize(("name", "schema"), APPS, ids=[name for name, _ in APPS])
def test_a_key_added_with_plus_that_the_schema_lacks_is_refused(name, schema):
    cfg = compose_app(name, ["+promt=x", "+sampling.tpo_k=1"])  # Hydra lets "+" add any key
    with pytest.raises(
        ValueError, match=r"^keys the schema does not have \(added with '\+'\?\): \['sampling.tpo_k', 'promt'\]$"
    ):
        refuse_extra_keys(cfg, schema)


@pytest.mark.parametrize("name", [name for name, _ in APPS])
def test_a_bad_dtype_lists_the_allowed_ones(name):
    with pytest.raises(ConfigCompositionException) as failure:
        compose_app(name, ["dtype=float64"])
    assert "Invalid value 'float64', expected one of [float32, bfloat16, float16]" in str(failure.value.__cause__)


@pytest.mark.parametrize("name", [name for name, _ in APPS])
def test_a_good_dtype_reads_as_its_bare_name(name):
    cfg = compose_app(name, ["dtype=bfloat16"])
    assert cfg.dtype is Dtype.bfloat16 and str(cfg.dtype) == "bfloat16"


def test_the_typed_eval_config_keeps_the_output_folder_names():
    """The run folder hashes the composed values (conf/eval.yaml ``run_name``): typing them must not move it.
    The expected names were composed before the schema existed, then again once the sampling config gained its
    speed switches (issue 19: they can change the predictions, so they are part of the key)."""
    assert compose_app("eval", [])["run_name"] == "eval-5083025d"
    assert compose_app("eval", ["sampling=greedy", "ckpt=/a/b"])["run_name"] == "eval-080679b2"
