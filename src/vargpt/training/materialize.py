"""Start-up at scale: VARGPT built without its parameters' memory, sharded, and only the local shards filled.

The FSDP path (``trainer=fsdp``, ``trainer.fsdp.meta_init``, the default):

1. ``prepare`` builds the model with every parameter on the meta device (:func:`parameters_on_meta`; buffers
   are computed for real: they are small and follow from the config) and plans the load against the
   checkpoint's headers (:func:`build_for_sharded_start`). The plan rides on the model until it is sharded.
2. ``configure_model`` applies activation checkpointing and compile, then ``shard_fsdp2`` shards it, whose last
   step is :func:`materialise`: ``to_empty`` gives each rank memory for its own shards only (and for the frozen
   VQ-VAE, which is not sharded and so is held and read whole), the buffers are put back, and each rank reads
   only its shards' rows of the checkpoint (``vargpt.checkpoint.sharded_load``).

A fresh start (no checkpoint) records the seeded initialisation while the model is built on the meta device
and replays it one parameter at a time into the shards (``init_replay``): the weights, and the random state
afterwards, are those of the whole-model build. A resumed run has nothing to read: Lightning's checkpoint load
fills the shards (a sharded checkpoint shard by shard) right after; until then they are zeros.

What keeps the whole-model path (build on the host, load, then shard): a checkpoint that fills only part of
the model (the stage-1 LLaVA + VAR + VQ-VAE triple: its planning lives in ``load_stage1``), a checkpoint whose
load would leave a non-norm parameter at its random initial value, an initialisation the record cannot replay
(``InitRecord.refused``), the rerun of a complete run (its export needs the whole model), the preference
stages, DDP and one device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vargpt.checkpoint.io import TensorSource
from vargpt.checkpoint.load import plan_whole_load
from vargpt.checkpoint.report import CheckpointMismatchError, LoadReport
from vargpt.checkpoint.sharded_load import copy_local_part, fill_local_shards, open_for_sharded_load
from vargpt.model.config import ModelConfig
from vargpt.model.vargpt import VARGPT, build_vargpt
from vargpt.training.init_replay import InitRecord, RecordInit

log = logging.getLogger(__name__)

# The attribute under which a model built on the meta device carries its PendingInit until it is sharded.
PENDING_ATTR = "_pending_init"
# Modules whose reset_parameters draws nothing at random (ones and zeros): a parameter of one that the
# checkpoint may lack (the released, unused ln_q) is re-initialised exactly on the local shard.
DETERMINISTIC_RESET = (nn.LayerNorm,)


@dataclass
class PendingInit:
    """How the local shards of a model built on the meta device get their values once it is sharded."""

    # Every buffer as built (host tensors; small): to_empty leaves garbage in their place.
    buffers: dict[str, torch.Tensor]
    # The checkpoint (released names) and the load planned from its headers; None: a fresh start or a resume.
    source: TensorSource | None
    report: LoadReport | None
    # Modules whose parameters the checkpoint lacks on purpose, reset in place (DETERMINISTIC_RESET kinds).
    resets: list[str]
    # A fresh start: the recorded initialisation and the meta parameters it knows, by name.
    replay: tuple[InitRecord, dict[str, nn.Parameter]] | None = None


@contextmanager
def parameters_on_meta(record: InitRecord | None = None) -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real (accelerate's
    ``init_empty_weights(include_buffers=False)``). Each parameter exists on the host only while it is created
    (usually ``torch.empty``, never touched), so the peak is one parameter, not the model. ``record``: also
    record the parameters' initialisation for a replay (``init_replay``)."""
    register = nn.Module.register_parameter
    recorder = RecordInit(record) if record is not None else None

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta
            if recorder is not None:
                recorder.register(meta, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with recorder if recorder is not None else nullcontext():
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(cfg: ModelConfig, tokenizer: Any, record: InitRecord | None = None) -> VARGPT:
    """``build_vargpt`` with its parameters on the meta device and its buffers computed (see the context)."""
    with parameters_on_meta(record):
        model = build_vargpt(cfg, tokenizer)
    if record is not None:
        record.check_model(model)
    real = [n for n, p in model.named_parameters() if not p.is_meta]
    meta_buffers = [n for n, b in model.named_buffers() if b.is_meta]
    if real or meta_buffers:
        raise RuntimeError(f"meta build: parameters not on meta {real[:3]}, buffers on meta {meta_buffers[:3]}")
    return model


def build_for_sharded_start(
    cfg: ModelConfig, tokenizer: Any, start: str | None, *, resume: bool = False
) -> VARGPT | None:
    """The model on the meta device carrying its :class:`PendingInit`. ``start``: the checkpoint it starts from;
    None with ``resume`` (Lightning loads the resume checkpoint) or without (a fresh start: the seeded
    initialisation is recorded and replayed shard by shard). None when this start needs the whole-model path
    (see the module docstring); a strict mismatch also returns None, so that the whole-model path raises it."""
    record = InitRecord() if start is None and not resume else None
    model = build_on_meta(cfg, tokenizer, record)
    if record is not None and record.refused:
        log.info(f"sharded start: the initialisation cannot be replayed ({record.refused}); building the model whole")
        return None
    source, report, resets = None, None, []
    if start is not None:
        try:
            planned = plan_whole_load(model, open_for_sharded_load(start))
        except CheckpointMismatchError:
            return None
        if planned is None:
            log.info(f"sharded start: {start} fills only part of the model; building it whole")
            return None
        source, report = planned
        resets = _owners_to_reset(model, report)
        if resets is None:
            return None
        log.info(f"initialising the model from {Path(start)} (each rank reads its own shards)")
        log.info(report.format())
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    replay = (record, dict(model.named_parameters())) if record is not None else None
    model.__dict__[PENDING_ATTR] = PendingInit(buffers, source, report, resets, replay)
    return model


def _owners_to_reset(model: nn.Module, report: LoadReport) -> list[str] | None:
    """The modules of the parameters the load keeps at their initial value, all of a deterministic kind; None
    when one is not (its initial value needs the seeded whole-model build)."""
    owners = []
    for key in report.initialised:
        if key in report.buffers:
            continue  # put back from the built buffers
        owner = key.rpartition(".")[0]
        if not isinstance(model.get_submodule(owner), DETERMINISTIC_RESET):
            log.info(f"sharded start: {key} keeps its random initial value; building the model whole")
            return None
        owners.append(owner)
    return sorted(set(owners))


def has_pending_init(model: nn.Module) -> bool:
    """Whether ``model`` was built on the meta device and waits for :func:`materialise`."""
    return PENDING_ATTR in model.__dict__


@torch.no_grad()
def materialise(model: nn.Module, device: torch.device) -> None:
    """Give a sharded model built by :func:`build_for_sharded_start` its local shards on ``device`` and fill
    them (buffers, then checkpoint rows and deterministic resets, or the replayed initialisation of a fresh start,
    or zeros before a resume). Call after ``fully_shard``."""
    pending: PendingInit = model.__dict__.pop(PENDING_ATTR)
    model.to_empty(device=device)
    for name, value in pending.buffers.items():
        model.get_buffer(name).copy_(value)
    for name in pending.resets:
        model.get_submodule(name).reset_parameters()
    if pending.replay is not None:
        record, originals = pending.replay
        for name, p in model.named_parameters():
            copy_local_part(p, record.replay(originals[name]))
    elif pending.source is None:
        for p in model.parameters():
            p.zero_()
    else:
        fill_local_shards(model, pending.source, pending.report)
