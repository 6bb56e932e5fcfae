"""Typed schema of the training app: the dataclasses behind ``conf/train.yaml`` and every group it composes.

``register_configs()`` stores the root schema in Hydra's ConfigStore as ``train_schema``; ``conf/train.yaml``
lists it first in its defaults, so every YAML value and command-line override is checked against these types
at compose time: a misspelt key fails naming its full path and the schema class it is not in, a wrong enum
value fails listing the allowed values, a wrong group option lists the available options. Before Hydra runs,
``unknown_override_key`` turns a misspelt command-line key into a message listing the keys that do exist
there; after composing, ``validate`` refuses keys added with ``+`` that the schema lacks and checks what the
types cannot express (stage hand-over, budgets). The batch arithmetic is checked once the world size is known
(``optim.accumulation_steps``).

The model part is ``vargpt.model.config.ModelConfig`` and the data part ``vargpt.data.config.DataConfig``;
this file only composes them. ``paths`` and ``logger``, shared with eval and generate, are in ``vargpt.cli_config``,
whose ``eval_schema`` and ``generate_schema`` ``register_configs`` stores too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf

from vargpt.cli_config import EvalConfig, GenerateConfig, LoggerConfig, PathsConfig
from vargpt.data.config import DataConfig, check_data_config
from vargpt.model.config import ModelConfig, register_resolvers
from vargpt.recipe_config import RecipeConfig

STAGE_NAMES = ("pretrain", "sft_mixed", "sft_gen", "dpo_gen")
# The embedded default's stage-0 stages (conf/stage/world_*.yaml): backbones made by the project's recipes.
WORLD_STAGE_NAMES = (
    "world_vqvae", "world_var", "world_vision", "world_lm", "world_clip", "world_llava_align", "world_llava_sft",
)  # fmt: skip
EXPORT_DTYPES = ("bf16", "fp32", "none")
# Counts that a zero or negative value would break late (a division by zero, a negative stream length) instead
# of at validation; null (where allowed) means "use the default".
POSITIVE_KEYS = (
    "stage.global_batch_size",
    "stage.num_samples",
    "stage.recipe.micro_batch_size",
    "data.micro_batch_size",
    "data.val_micro_batch_size",
    "data.samples_per_epoch",
    "data.prefetch_factor",
    "data.cutoff_len",
    "trainer.num_nodes",
)


# --------------------------------------------------------------------------------------------- stage (VARGPT 1-3)
class Schedule(Enum):
    """Learning-rate schedule after the linear warmup."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimizerConfig:
    """AdamW, completed with parameter groups in ``configure_optimizers`` (``_partial_``: params come later)."""

    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Applied to matrices only: norms, biases, embeddings and position tables never decay (optim.py).
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: Schedule = Schedule.cosine
    # Fraction of the stage's optimizer steps spent warming up linearly from 0.
    warmup_ratio: float = 0.03
    # Final learning rate as a fraction of the peak (cosine / linear decay towards it).
    min_lr_ratio: float = 0.0


@dataclass
class LossWeights:
    """Weights of the two losses in the total the optimizer sees (the release: 1:1)."""

    text: float = 1.0
    image: float = 1.0


class PreferenceLossType(Enum):
    """The preference losses of VARGPT-v1.1's LLaMA-Factory fork (vargpt.training.preference)."""

    sigmoid = "sigmoid"  # DPO
    ipo = "ipo"
    orpo = "orpo"  # no reference model
    simpo = "simpo"  # no reference model


class PreferenceReference(Enum):
    """Where the reference model's log-probabilities come from."""

    precomputed = "precomputed"  # stored in the shards once (python -m vargpt.preference.reference_logps)
    frozen_copy = "frozen_copy"  # a frozen copy of the starting model, run beside the policy


class PreferenceTarget(Enum):
    """What the log-probabilities sum over in the chosen and rejected replies."""

    image = "image"  # the VQ codes at the generation slots (VARGPT-v1.1's image DPO)
    text = "text"  # the reply's labelled text tokens (LLaMA-Factory's text DPO)


@dataclass
class PreferenceConfig:
    """A preference stage (``stage=dpo_gen``): LLaMA-Factory's DPO settings, its defaults
    (``pref_beta`` 0.1, ``pref_ftx`` 0, ``simpo_gamma`` 0.5, ``dpo_label_smoothing`` 0)."""

    loss_type: PreferenceLossType = PreferenceLossType.sigmoid
    beta: float = 0.1
    # Weight of the SFT term: minus the chosen reply's length-averaged log-probability.
    ftx: float = 0.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    reference: PreferenceReference = PreferenceReference.precomputed
    target: PreferenceTarget = PreferenceTarget.image


@dataclass
class StageConfig:
    """One VARGPT training stage as data: what trains, how fast, on what, for how long, from where."""

    name: str = MISSING
    index: int = MISSING
    description: str = ""
    # Module-name prefix -> trainable. A prefix matches the sub-module of that name and everything under it
    # (not a substring: ``image_gen_projector`` does not match ``image_gen_projector_out``); unlisted = frozen.
    trainable: dict[str, bool] = field(default_factory=dict)
    # Module-name prefix -> learning rate for the parameters under it (others use optimizer.lr).
    lr_by_module: dict[str, float] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_clip: float = 1.0
    # Samples per optimizer step over all ranks; accumulation = global / (micro batch * world size).
    global_batch_size: int = 128
    # Training budget in samples; optimizer steps = ceil(num_samples / global_batch_size).
    num_samples: int = MISSING
    loss_weights: LossWeights = field(default_factory=LossWeights)
    # Where the weights start: "previous" = the final checkpoint of ``previous_stage`` in the same run root
    # (paths.log_dir), null = as the model config builds them (model.init_from), or a checkpoint path.
    init_from: str | None = None
    previous_stage: str | None = None
    # A stage-0 recipe trains a backbone instead of VARGPT (vargpt.backbones); null = a VARGPT stage.
    recipe: RecipeConfig | None = None
    # A preference stage trains on chosen / rejected pairs (data.pairs=true) with this loss; null = the
    # understanding and generation losses.
    preference: PreferenceConfig | None = None


# --------------------------------------------------------------------------------------------- trainer
class Strategy(Enum):
    """How processes share the work. fsdp = FSDP2 (fully_shard) through Lightning's ModelParallelStrategy."""

    auto = "auto"
    ddp = "ddp"
    ddp_fork = "ddp_fork"
    fsdp = "fsdp"


class MixedPrecision(Enum):
    """FSDP2 parameter dtype during compute: auto = bf16 on a GPU with a bf16 trainer precision, else fp32."""

    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class FSDPConfig:
    # Free the gathered parameters after each unit's forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    mixed_precision: MixedPrecision = MixedPrecision.auto
    # One file per rank (fast, needs the same world size to resume); false gathers a full checkpoint on rank 0.
    save_distributed_checkpoint: bool = True
    # Build the model on the meta device, shard it, then fill only this rank's shards from the checkpoint (its
    # rows alone are read) or a replay of the seeded init (vargpt.training.materialize); false builds and loads the
    # whole model on every rank first (docs/performance.md section 10).
    meta_init: bool = True


# torch.compile's modes, named as torch names them (the functional form allows the hyphens).
CompileMode = Enum(
    "CompileMode",
    {m: m for m in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")},
    module=__name__,
)


@dataclass
class CompileConfig:
    """``torch.compile`` of the repeated blocks (``VARGPTModule.configure_model``)."""

    # Compile each LLM decoder layer, VAR block and vision encoder layer (module.compile(), in place: state-dict
    # keys unchanged), after activation checkpointing and before FSDP2 sharding. One graph per block kind,
    # reused by all its copies. Off by default: the gain depends on the GPU; measure it (docs/performance.md).
    enabled: bool = False
    mode: CompileMode = CompileMode["default"]


@dataclass
class TrainerConfig:
    """The Lightning Trainer, built by ``vargpt.training.trainer.build_trainer`` (not passed blindly)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Strategy = Strategy.auto
    precision: str = "32-true"
    log_every_n_steps: int = 10
    # Validation cadence in optimizer steps (null = no validation during training).
    val_every_n_steps: int | None = None
    limit_val_batches: int = 10
    # Validation also scores every generation target against another sample's prompt (one more forward per
    # batch) and logs val/prompt_gain_image[_s<k>]: how much the right prompt lowers each scale's image CE.
    val_prompt_gain: bool = True
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True
    # DDP: a batch without generation (or understanding) samples leaves those trainable parameters unused.
    find_unused_parameters: bool = True
    # Recompute each LLM layer / VAR block / vision layer in backward instead of storing its activations.
    activation_checkpointing: bool = False
    compile: CompileConfig = field(default_factory=CompileConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


# --------------------------------------------------------------------------------------------- tracking, callbacks
@dataclass
class CheckpointConfig:
    # A resumable checkpoint every N optimizer steps (plus last.ckpt at each save and at the end).
    every_n_steps: int = 1000
    # How many of the periodic checkpoints to keep (-1 = all); last.ckpt is always kept.
    keep_last: int = 2
    # Export the final model in the released HF folder layout at the end of the stage, in this dtype:
    # bf16 (as released) | fp32 (lossless) | none.
    export: str = "bf16"


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Least optimizer steps between two reads of the throughput counters (samples/s, tokens/s, MFU are averaged
    # over the steps between reads; reads happen at log steps, trainer.log_every_n_steps).
    throughput_window: int = 10
    lr_monitor: bool = True
    # Further callbacks by name: {_target_: ..., kwargs...} (e.g. the evaluation callbacks).
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- root
@dataclass
class TrainConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    seed: int = 1234
    # auto: continue from <run_dir>/checkpoints/last.ckpt if it exists; true: it must exist; false: start over;
    # or the path of a checkpoint to continue from.
    resume: str = "auto"
    # stage-model-<hash of the command-line overrides>; explicit, so seeding cannot make runs share a name.
    run_name: str = "${stage.name}-${model.name}-${vargpt_hash:${hydra:job.override_dirname}}"


def short_hash(text: str, n: int = 8) -> str:
    """Stable short hash of a string (the overrides of a run), used in run names and folders."""
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def register_configs() -> None:
    """Register the root schema and the ``vargpt_hash`` resolver; idempotent (tests compose many times)."""
    register_resolvers()
    if not OmegaConf.has_resolver("vargpt_hash"):
        OmegaConf.register_new_resolver("vargpt_hash", lambda s: short_hash(str(s)))
    schemas = {"train_schema": TrainConfig, "eval_schema": EvalConfig, "generate_schema": GenerateConfig}
    for name, schema in schemas.items():
        ConfigStore.instance().store(name=name, node=schema)


def validate(cfg: DictConfig) -> None:
    """Checks the types cannot express; raises ValueError naming the keys and allowed values."""
    refuse_extra_keys(cfg, TrainConfig)
    stage = cfg.stage
    known = [*STAGE_NAMES, *WORLD_STAGE_NAMES]
    if stage.previous_stage is not None and stage.previous_stage not in known:
        raise ValueError(f"stage.previous_stage={stage.previous_stage!r}: expected one of {known} or null")
    if stage.init_from == "previous" and stage.previous_stage is None:
        raise ValueError(f"stage.init_from=previous needs stage.previous_stage (one of {known})")
    for key in POSITIVE_KEYS:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ValueError(f"{key} must be positive, got {value}")
    if not 0.0 <= stage.scheduler.warmup_ratio < 1.0:
        raise ValueError(f"stage.scheduler.warmup_ratio must be in [0, 1), got {stage.scheduler.warmup_ratio}")
    if stage.recipe is None and not any(stage.trainable.values()):
        raise ValueError(f"stage {stage.name!r} trains nothing: set at least one stage.trainable entry to true")
    if cfg.callbacks.checkpoint.export not in EXPORT_DTYPES:
        raise ValueError(
            f"callbacks.checkpoint.export={cfg.callbacks.checkpoint.export!r}: expected one of {EXPORT_DTYPES}"
        )
    _check_preference(stage, cfg.data)
    if cfg.data.gen_resize_ratio < 1.0:
        raise ValueError(f"data.gen_resize_ratio must be >= 1.0 (VAR: 1.125), got {cfg.data.gen_resize_ratio}")
    check_data_config(cfg.data)
    if not str(cfg.resume).strip():
        raise ValueError("resume: expected auto | true | false | a checkpoint path")


def _check_preference(stage: DictConfig, data: DictConfig) -> None:
    """A preference stage needs pair data compared on its target, and its constants in range; pair data needs one."""
    p = stage.preference
    if p is None:
        if data.pairs:
            raise ValueError(f"data.pairs=true: stage {stage.name!r} is not a preference stage (stage=dpo_gen is)")
        return
    if not data.pairs:
        raise ValueError(f"stage {stage.name!r} is a preference stage: it needs pair data (data.pairs=true)")
    if data.pair_target != p.target.value:
        raise ValueError(
            f"data.pair_target={data.pair_target} but stage.preference.target={p.target.value}: set them equal"
        )
    if p.beta <= 0:
        raise ValueError(f"stage.preference.beta must be positive, got {p.beta}")
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ValueError(f"stage.preference.label_smoothing must be in [0, 0.5), got {p.label_smoothing}")
    if p.ftx < 0:
        raise ValueError(f"stage.preference.ftx must be >= 0, got {p.ftx}")


def refuse_extra_keys(cfg: DictConfig, schema: type) -> None:
    """Refuse the keys of ``cfg`` that ``schema`` lacks (Hydra lets ``+key=value`` add them), naming them."""
    extra = _extra_keys(cfg, schema, "")
    if extra:
        raise ValueError(f"keys the schema does not have (added with '+'?): {extra}")


def _extra_keys(node: DictConfig, schema: type, path: str) -> list[str]:
    """Keys of ``node`` that its dataclass schema lacks (Hydra lets ``+key=value`` add them)."""
    fields = _field_types(schema)
    extra = []
    for key in node:
        if key not in fields:
            extra.append(f"{path}{key}")
            continue
        field_type = _unwrap_optional(fields[key])
        child = node._get_node(key)
        if dataclasses.is_dataclass(field_type) and isinstance(child, DictConfig) and not child._is_none():
            extra += _extra_keys(child, field_type, f"{path}{key}.")
    return extra


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def unknown_override_key(
    args: list[str], schema: type = TrainConfig, root_groups: tuple[str, ...] | None = None
) -> str | None:
    """A message for the first command-line override whose key the schema lacks, listing the keys that exist
    at that level (Hydra's own error names the key and the schema class, not the alternatives). ``root_groups``:
    the top-level names outside the schema that are config groups; None = take any unknown top-level name for one
    (training's experiment, local...)."""

    try:  # flags and their values (--cfg job) are not overrides; Hydra reports malformed ones itself
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except OverrideParseException:
        return None
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or "@" in key or "/" in key:
            continue
        tp: Any = schema
        path: list[str] = []
        for part in key.split("."):
            if not dataclasses.is_dataclass(tp):
                break  # a dict or a value: any key goes (or Hydra checks the value)
            fields = _field_types(tp)
            if part not in fields:
                if not path and (root_groups is None or part in root_groups):
                    break  # not a schema key: a config group (experiment, hydra, local) that Hydra checks
                where = ".".join(path) or schema.__name__
                return f"unknown key {key!r}: {where} has {sorted(fields)}"
            path.append(part)
            tp = _unwrap_optional(fields[part])
    return None
