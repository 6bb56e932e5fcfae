"""Start-up under FSDP: peak host memory per rank and time to the first training step, whole-model path vs the
sharded start (vargpt.training.materialize). Not a test.

    python -m bench.startup                                          # tiny, 2 CPU ranks (gloo), old,new
    python -m bench.startup model=bench/configs/mid.yaml             # the 0.8 B model (~3.2 GB fp32 per path)
    python -m bench.startup model=tiny ranks=2 paths=new,old repeats=2
    python -m bench.startup start=fresh                              # no checkpoint: the seeded initialisation
    python -m bench.startup --help

What one rank does, as a run with ``trainer=fsdp`` starting from a checkpoint (``model.init_from`` or
``stage.init_from``) does it before its first step:

* ``old`` (``trainer.fsdp.meta_init=false``): build the whole model in fp32 on the host (seeded init), load the
  whole checkpoint into it (``load_init_weights``), then ``shard_fsdp2``;
* ``new`` (the default): ``build_for_sharded_start`` (parameters on the meta device, the load planned from the
  checkpoint's headers), then ``shard_fsdp2``, whose end materialises the local shards and reads their rows.

``start=fresh`` starts from no checkpoint: ``old`` builds the whole seeded model, ``new`` records the seeded
initialisation on the meta device and replays it parameter by parameter into the shards (``init_replay``).

Then the stage's trainable set, one synthetic micro batch (``bench.train_batches``), forward + backward + AdamW.
The checkpoint is one fp32 ``model.safetensors`` of a random model, written once under ``workdir`` by a separate
process (it is the released/exported layout; our own sharded checkpoints take the DCP branch, same plan).

Reported per path (the worst rank): ``ready RSS`` the peak host memory (VmHWM) when the model is sharded and
filled, ``step RSS`` the peak through the first step (adds gradients and AdamW state, the same in both paths),
``base`` the RSS after imports and the process group (the interpreter, torch, transformers), ``fp32 size`` the
whole model's parameters in fp32, ``ratio`` ready RSS / fp32 size (the issue's target: <= 0.6 with 2 ranks) and
``ratio-base`` (ready - base) / fp32 size; ``to ready s`` and ``to step s`` from the start of the build.
Run one measurement at a time on a shared machine: every rank of the old path holds the whole model.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

from bench.common import load_model_cfg, load_stage, parse_args, print_table
from bench.train_batches import make_batch, synthetic_ids, to_device
from vargpt.model import build_vargpt
from vargpt.training.checkpointing import load_init_weights
from vargpt.training.materialize import build_for_sharded_start, build_on_meta
from vargpt.training.parallel import shard_fsdp2
from vargpt.training.stage import apply_stage

DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "ranks": 2,
    "paths": ["old", "new"],
    "repeats": 1,
    "start": "checkpoint",
    "stage": "sft_mixed",
    "micro_batch_size": 2,
    "gen_frac": 0.5,
    "seq_len": 96,
    "gen_prompt_len": 8,
    "reply_frac": 0.3,
    "len_jitter": 0.0,
    "codes": True,
    "threads": 1,
    "workdir": None,
}


def proc_status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak resident set, VmRSS: now) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def write_checkpoint(_: int, args: dict[str, Any], overrides: list[str], out: str) -> None:
    """One fp32 ``model.safetensors`` of a random model (seed 5), written in its own process."""
    torch.manual_seed(5)
    cfg = load_model_cfg(args["model"], overrides)
    model = build_vargpt(cfg, synthetic_ids(cfg.llm.vocab_size))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out) / "model.safetensors"))


def run_rank(rank: int, args: dict[str, Any], overrides: list[str], path: str, ckpt: str, port: int, out: str) -> None:
    """One rank of one start-up (``path``: old | new); writes its figures to ``out``/rank<rank>.json."""
    torch.set_num_threads(int(args["threads"]))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=int(args["ranks"]))
    cfg = load_model_cfg(args["model"], overrides)
    ids = synthetic_ids(cfg.llm.vocab_size)
    stage = load_stage(args["stage"])
    base = proc_status_gib("VmRSS")
    dist.barrier()
    t0 = time.perf_counter()
    start = ckpt if args["start"] == "checkpoint" else None
    torch.manual_seed(0)
    if path == "old":
        model = build_vargpt(cfg, ids)
        if start is not None:
            load_init_weights(model, start)
    else:
        model = build_for_sharded_start(cfg, ids, start)
        if model is None:
            raise SystemExit(f"start={args['start']}: the sharded start refused it (see the log)")
    model.train()
    apply_stage(model, stage["trainable"], stage["name"])
    shard_fsdp2(model, init_device_mesh("cpu", (int(args["ranks"]),)), bf16=False)
    t_ready, ready = time.perf_counter() - t0, proc_status_gib("VmHWM")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out_step = model(to_device(make_batch(model, args, seed=0), torch.device("cpu"), ids))
    out_step.loss.backward()
    optimizer.step()
    t_step, step = time.perf_counter() - t0, proc_status_gib("VmHWM")
    record = {"base": base, "ready": ready, "step": step, "t_ready": t_ready, "t_step": t_step}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: dict[str, Any], overrides: list[str], path: str, ckpt: Path, work: Path) -> dict[str, float]:
    """One start-up with ``ranks`` spawned processes; the worst rank's figures."""
    out = Path(tempfile.mkdtemp(dir=work))
    spawn_args = (args, overrides, path, str(ckpt), free_port(), str(out))
    torch.multiprocessing.spawn(run_rank, args=spawn_args, nprocs=int(args["ranks"]))
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {k: max(r[k] for r in ranks) for k in ranks[0]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, extra = parse_args(argv, DEFAULTS, __doc__)
    overrides = extra["model."]
    cfg = load_model_cfg(args["model"], overrides)
    fp32_gib = sum(p.numel() for p in build_on_meta(cfg, synthetic_ids(cfg.llm.vocab_size)).parameters()) * 4 / 2**30
    with tempfile.TemporaryDirectory(dir=args["workdir"]) as tmp:
        work = Path(tmp)
        ckpt = work / "checkpoint"
        ckpt.mkdir()
        if args["start"] == "checkpoint":
            torch.multiprocessing.spawn(write_checkpoint, args=(args, overrides, str(ckpt)), nprocs=1)
        records = []
        for _ in range(int(args["repeats"])):
            for path in args["paths"]:
                fig = measure(args, overrides, path, ckpt, work)
                records.append({"path": path, **fig})
                print(f"{path}: {fig}", flush=True)
    rows = [
        [
            r["path"],
            str(args["start"]),
            str(args["model"]),
            str(args["ranks"]),
            f"{r['ready']:.2f}",
            f"{r['step']:.2f}",
            f"{r['base']:.2f}",
            f"{fp32_gib:.2f}",
            f"{r['ready'] / fp32_gib:.2f}",
            f"{(r['ready'] - r['base']) / fp32_gib:.2f}",
            f"{r['t_ready']:.1f}",
            f"{r['t_step']:.1f}",
        ]
        for r in records
    ]
    header = ["path", "start", "model", "ranks", "ready RSS GiB", "step RSS GiB", "base GiB", "fp32 size GiB"]
    header += ["ratio", "ratio-base", "to ready s", "to step s"]
    print_table("Start-up per rank (worst rank; RSS = VmHWM, peak resident host memory)", header, rows)
    return records


if __name__ == "__main__":
    main()
