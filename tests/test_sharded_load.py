"""Start-up at scale (vargpt.training.materialize): a model built on the meta device, sharded with FSDP2, then
filled rank by rank equals, bit for bit, the whole-model path (build, load, shard): every parameter (gathered),
every buffer. Sources: a fresh, seeded start (the initialisation replayed shard by shard, init_replay), a
safetensors folder lacking the unused ``ln_q`` (reset on the shard), one in bf16 (cast on load) and a torch
distributed checkpoint in Lightning's layout. One process (a 1-rank gloo group) and two.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

from vargpt.checkpoint.sharded_load import DCP_STATE_PREFIX
from vargpt.model import build_vargpt, load_model_config
from vargpt.tokens import SpecialTokenIds
from vargpt.training.checkpointing import load_init_weights
from vargpt.training.materialize import build_for_sharded_start, has_pending_init
from vargpt.training.parallel import shard_fsdp2

TINY = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"
IDS = SpecialTokenIds(image=1000, pad=1001, gen_start=1002, gen_end=1003, gen_pad=1004, eos=2, bos=1)


def write_sources(folder: Path) -> dict[str, Path]:
    """A safetensors folder (without the projectors' unused ln_q), the same in bf16, and a distributed checkpoint
    folder (Lightning's ``state_dict.model.*`` keys), all of one random tiny model (seed 5; the models under test
    are seeded 0)."""
    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in build_vargpt(load_model_config(TINY), IDS).state_dict().items()}
    (folder / "st").mkdir(parents=True)
    save_file({k: v for k, v in state.items() if ".ln_q." not in k}, folder / "st" / "model.safetensors")
    # bf16 as released: the loads cast to fp32, and the rounded attention mask is the model's own again.
    (folder / "bf16").mkdir()
    save_file(
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()},
        folder / "bf16" / "model.safetensors",
    )
    lightning_layout = {DCP_STATE_PREFIX.rstrip("."): {"model." + k: v for k, v in state.items()}}
    dcp.save(lightning_layout, checkpoint_id=str(folder / "dcp"), no_dist=True)
    return {"safetensors": folder / "st", "bf16": folder / "bf16", "dcp": folder / "dcp"}


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (full, gathered from the shards) and every buffer, persistent or not."""
    out = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    return out | {n: b for n, b in model.named_buffers()}


def compare_paths(sources: dict[str, Path | None], ranks: int) -> None:
    """Both paths for every source (None: a fresh, seeded start) on a mesh of ``ranks`` (the process group is
    up); asserts bit equality, and for a fresh start the same random state afterwards."""
    cfg = load_model_config(TINY)
    mesh = init_device_mesh("cpu", (ranks,))
    for name, path in {**sources, "fresh": None}.items():
        torch.manual_seed(0)
        whole = build_vargpt(cfg, IDS)
        if path is not None:
            load_init_weights(whole, path)
        state_after_build = torch.get_rng_state()
        shard_fsdp2(whole, mesh, bf16=False)
        torch.manual_seed(0)
        lean = build_for_sharded_start(cfg, IDS, None if path is None else str(path))
        assert lean is not None and has_pending_init(lean)
        if path is None:
            assert torch.equal(torch.get_rng_state(), state_after_build)
        shard_fsdp2(lean, mesh, bf16=False)
        assert not has_pending_init(lean)
        assert not any(t.is_meta for t in [*lean.parameters(), *lean.buffers()])
        expected, got = gathered(whole), gathered(lean)
        assert expected.keys() == got.keys()
        differ = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_start_equals_whole_model_path_one_rank(tmp_path):
    sources = write_sources(tmp_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        compare_paths(sources, ranks=1)
        # The stage-1 triple fills only part of the model: it keeps the whole-model path.
        assert build_for_sharded_start(load_model_config(TINY), IDS, f"var={sources['dcp']}") is None
    finally:
        dist.destroy_process_group()


def _rank(rank: int, sources: dict[str, Path], port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        compare_paths(sources, ranks=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import the whole stack
def test_sharded_start_equals_whole_model_path_two_ranks(tmp_path):
    sources = write_sources(tmp_path)
    torch.multiprocessing.spawn(_rank, args=(sources, free_port()), nprocs=2)
