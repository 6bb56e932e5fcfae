"""Parallelism policy: FSDP2 sharding, activation checkpointing and the strategy objects Lightning runs with.

FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``: each LLM decoder
layer, VAR block and vision encoder layer (``VARGPT.fsdp_units()``) becomes its own unit, then the root
takes the rest (embeddings, heads, projectors). It also runs on CPU processes with gloo, unlike Lightning's
FSDP1 strategy, so CI exercises sharded training and distributed checkpoints. Sharding keeps parameter names
and per-parameter ``requires_grad`` (no flat parameters), so the stage's frozen set and optimizer groups stay
as they are.

On a GPU with a bf16 trainer precision the units compute in bf16 (reduce in fp32). The frozen VQ-VAE is left
out of sharding (replicated, like a buffer): its codes must not depend on the compute dtype (VARGPT-REFERENCE.md
9.8), and the model calls its methods (``img_to_codes``), not its forward, which FSDP's hooks would need.

Every rank must run the same units in the same order (each gathers its parameters collectively): a rank whose
micro batch has no understanding image, or no generation target, while another's has, gets a masked dummy one
(``align_branches``).

A model built on the meta device (``materialize.build_for_sharded_start``, the default FSDP start from a
checkpoint) gets its local shards at the end of ``shard_fsdp2``: each rank holds and reads only its own.

Activation checkpointing uses the composable ``checkpoint`` API, which does not wrap modules, so state-dict
keys keep the released names.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

from vargpt.training.materialize import has_pending_init, materialise

log = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with every process in one data-parallel (sharding) group, no tensor parallelism.

    The parent's "auto" sizes put all local devices in a tensor-parallel group; sharding-only training wants
    data_parallel = world size, known once the processes exist.
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def build_strategy(name: str, find_unused_parameters: bool, save_distributed_checkpoint: bool) -> Strategy | str:
    """The Lightning strategy for ``trainer.strategy`` (auto | ddp | ddp_fork | fsdp).

    ddp starts the other ranks by re-running the script (torchrun style); ddp_fork forks them from this process,
    which is what a local -m sweep needs. (Spawning would pickle the model, and transformers 5 models with
    their output-capturing hooks do not survive pickling.)
    """
    if name == "fsdp":
        return FSDP2Strategy(save_distributed_checkpoint=save_distributed_checkpoint)
    if name in ("ddp", "ddp_fork"):
        start = "popen" if name == "ddp" else "fork"
        return DDPStrategy(start_method=start, find_unused_parameters=find_unused_parameters)
    return name


def apply_activation_checkpointing(units: list[nn.Module]) -> None:
    """Recompute each unit's activations in backward instead of storing them (non-reentrant, in place)."""
    # Here, not at the top: torch builds without distributed support lack it.
    from torch.distributed._composable import checkpoint

    for unit in units:
        checkpoint(unit)


def shard_fsdp2(
    model: nn.Module,
    mesh: Any,
    *,
    bf16: bool,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard every unit of ``model.fsdp_units()``, then the root (VQ-VAE replicated), in place; a model built
    on the meta device then gets this rank's shards and fills them (``materialize.materialise``)."""
    # Here, not at the top: torch builds without distributed support lack it.
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Inputs stay as they are: the vision tower casts pixels to its own dtype, and the VQ-VAE must see fp32.
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    units = model.fsdp_units()
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    vqvae = set(model.vae_local.parameters())
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy, ignored_params=vqvae)
    log.info(f"FSDP2: {len(units)} units + root sharded over {mesh.size()} ranks, VQ-VAE replicated (bf16: {bf16})")
    if has_pending_init(model):
        materialise(model, mesh_device(mesh))


def mesh_device(mesh: Any) -> torch.device:
    """This rank's device of ``mesh`` (its current GPU, or the CPU)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def branch_presence(batch: dict[str, Any]) -> tuple[bool, bool]:
    """(has understanding images, has generation targets) of a batch."""
    und = batch.get("pixel_values") is not None and batch["pixel_values"].shape[0] > 0
    gen = batch.get("gen_codes") is not None or (
        batch.get("pixel_gen_values") is not None and batch["pixel_gen_values"].shape[0] > 0
    )
    return und, gen


def add_missing_branches(batch: dict[str, Any], model: nn.Module, und: bool, gen: bool) -> dict[str, Any]:
    """Append one dummy sample per requested branch (an ``<image>`` block, or a generation block of a blank
    image), fully masked out of the text loss, so that this rank runs the same sharded units as the others.

    FSDP gathers and scatters parameters unit by unit in the same order on every rank: a rank whose micro
    batch has no understanding image (or no generation target) while another rank's has would skip the vision
    tower (the VAR blocks) and the collectives would no longer match. The caller zeroes the image loss of a
    batch whose only generation sample is the dummy.
    """
    ids = model.ids
    ids_BT, mask_BT, labels_BT = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows: list[list[int]] = []
    out = dict(batch)
    device = ids_BT.device
    if und:
        rows.append([ids.image] * model.num_image_tokens)
        size = model.cfg.vision.image_size
        out["pixel_values"] = torch.zeros(1, 3, size, size, device=device)
    if gen:
        rows.append([ids.gen_start] + [ids.gen_pad] * model.num_gen_tokens + [ids.gen_end])
        if batch.get("gen_codes") is not None:
            out["gen_codes"] = torch.cat([batch["gen_codes"], batch["gen_codes"][:1] * 0])
        else:
            size = model.cfg.vqvae.image_size
            blank = torch.zeros(1, 3, size, size, device=device)
            previous = batch.get("pixel_gen_values")
            out["pixel_gen_values"] = blank if previous is None else torch.cat([previous, blank])
    T = max([ids_BT.shape[1]] + [len(r) for r in rows])
    new_ids = torch.full((len(rows), T), ids.pad, dtype=ids_BT.dtype, device=device)
    new_mask = torch.zeros((len(rows), T), dtype=mask_BT.dtype, device=device)
    for i, row in enumerate(rows):
        new_ids[i, : len(row)] = torch.tensor(row, dtype=ids_BT.dtype, device=device)
        new_mask[i, : len(row)] = 1

    def widen(x_BT: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x_BT, (0, T - x_BT.shape[1]), value=fill)

    out["input_ids"] = torch.cat([widen(ids_BT, ids.pad), new_ids])
    out["attention_mask"] = torch.cat([widen(mask_BT, 0), new_mask])
    out["labels"] = torch.cat([widen(labels_BT, -100), torch.full_like(new_ids, -100)])
    return out


def align_branches(batch: dict[str, Any], model: nn.Module) -> tuple[dict[str, Any], bool]:
    """Make every rank run the branches any rank runs (see ``add_missing_branches``).

    Returns the batch and whether its generation targets are only the dummy (then its image loss must not
    count). One small all-reduce per micro batch.
    """
    und, gen = branch_presence(batch)
    flags = torch.tensor([und, gen], dtype=torch.int32, device=batch["input_ids"].device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    need_und, need_gen = bool(flags[0]) and not und, bool(flags[1]) and not gen
    if not (need_und or need_gen):
        return batch, False
    return add_missing_branches(batch, model, need_und, need_gen), need_gen
