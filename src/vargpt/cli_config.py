"""Typed schemas of the command-line apps besides training: ``conf/eval.yaml`` and ``conf/generate.yaml``.

Also the sections every app shares (``paths``, ``logger``), which the training schema (``vargpt.config``)
composes too. ``vargpt.config.register_configs`` stores ``eval_schema`` and ``generate_schema`` in Hydra's
ConfigStore; each YAML lists its schema first in its defaults, so every value and override is checked at compose
time as in training: a misspelt key fails naming the schema class it is not in, a bad ``dtype`` lists the allowed
ones. ``src/eval.py`` and ``src/generate.py`` also run ``vargpt.config.unknown_override_key`` on the command line
first, so that a misspelt key there is answered with the keys that exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from vargpt.model.config import ModelConfig
from vargpt.model.sampling_config import SamplingConfig

# The only top-level override names of eval and generate outside their schemas (``hydra.run.dir=...``): any
# other unknown name is a misspelt key (``unknown_override_key(..., root_groups=NON_SCHEMA_GROUPS)``).
NON_SCHEMA_GROUPS = ("hydra",)


# --------------------------------------------------------------------------------------------- shared sections
@dataclass
class PathsConfig:
    # The run root: mlflow.db, mlartifacts/, runs/<run_name>/ (checkpoints, export, summary), stages/, multirun/.
    log_dir: str = "logs"
    # Where datasets and the generated shapes world live.
    data_dir: str = "data"
    # This run's folder; the same command maps to the same folder, which is what ``resume: auto`` relies on.
    run_dir: str = "${paths.log_dir}/runs/${run_name}"


class LoggerBackend(Enum):
    mlflow = "mlflow"
    csv = "csv"
    none = "none"


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.mlflow
    experiment_name: str = "vargpt"
    # null = sqlite:///<paths.log_dir>/mlflow.db (artifacts in <paths.log_dir>/mlartifacts).
    tracking_uri: str | None = None
    # Extra MLflow tags for every run.
    tags: dict[str, str] = field(default_factory=dict)


class Dtype(StrEnum):
    """The dtype the model runs in. A StrEnum: ``str(cfg.dtype)`` and ``${dtype}`` give the bare name."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# --------------------------------------------------------------------------------------------- eval
@dataclass
class ClipJudgeConfig:
    """The CLIP judge of generated shapes images (``vargpt.eval.clip_score``); skipped while weights is null."""

    arch: str = "ViT-B-32"
    weights: str | None = None
    # open_clip config overrides of a small CLIP (embed_dim, vision_cfg, text_cfg).
    model_cfg: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """``conf/eval.yaml``: what ``src/eval.py`` evaluates, on which benchmarks, and where it writes."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt: str | None = None
    tokenizer: str | None = None
    # Checked against vargpt.eval.benchmarks.BENCHMARKS (and "shapes") when the run starts.
    benchmarks: list[str] = field(default_factory=lambda: ["shapes"])
    data_root: str = "${paths.data_dir}"
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    faithful: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N: free-form, torch checks it
    dtype: Dtype = Dtype.float32
    # vargpt.eval.shapes_eval.ShapesEvalConfig checks these keys when the shapes evaluation starts (typing the
    # section with it here would add its batch_size key to the composed config and to every run's record).
    shapes: dict[str, Any] = field(default_factory=dict)
    clip: ClipJudgeConfig = field(default_factory=ClipJudgeConfig)
    run_name: str = "eval"
    out_dir: str = "${paths.log_dir}/eval/${run_name}"


# --------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateConfig:
    """``conf/generate.yaml``: one prompt, ``n`` samples, PNGs and a manifest in ``out_dir``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt: str | None = None
    tokenizer: str | None = None
    prompt: str = "Draw a red circle"
    image: str | None = None
    system: str | None = None
    n: int = 1
    force_image: bool | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N: free-form, torch checks it
    dtype: Dtype = Dtype.float32
    out_dir: str = "${paths.log_dir}/generate/${now:%Y-%m-%d_%H-%M-%S}"
    run_name: str = "generate"  # paths.run_dir interpolates it; not used otherwise
