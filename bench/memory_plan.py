"""Memory plan on paper: per-GPU bytes of the 9.3 B VARGPT under FSDP2 full sharding, per stage. Not a test.

    python -m bench.memory_plan                                  # the default: 8 GPUs x 80 GB, micro batch 8
    python -m bench.memory_plan world_size=4 micro_batch_size=4 gpu_gib=80
    python -m bench.memory_plan model=vargpt_llava_7b model.llm.num_hidden_layers=40

Parameter counts are exact (the model is built on the meta device and each stage's trainable set applied with
``apply_stage``). The layout is the one ``vargpt.training.parallel.shard_fsdp2`` makes: every LLM decoder layer,
VAR block and vision layer is an FSDP2 unit, the root takes the rest; the VQ-VAE is replicated. Per GPU:

    weights      4 B x (all parameters - VQ-VAE) / W   fp32 master shards (frozen ones too: the whole model is
                 + 4 B x VQ-VAE                        sharded and FSDP2 keeps the sharded dtype), VQ-VAE replicated
    gathered     2 B x (root + 2 x largest unit)       bf16 all-gathered compute copies: the root stays gathered
                                                       for the step, one unit computes while the next is prefetched
    gradients    4 B x trainable / W                   fp32 sharded (reduce-scatter in fp32)
                 + 6 B x largest trained unit          the unit's (or the root's trained) unsharded bf16 grads
                                                       + their fp32 reduce-scatter input
    optimizer    8 B x trainable / W                   AdamW exp_avg + exp_avg_sq, fp32 sharded
    activations  per token and layer, bytes measured on this machine (below) for a bf16 LLaMA layer and VAR
                 block, trained or frozen-with-gradient-flowing; with activation checkpointing each unit keeps
                 only its bf16 input (2 h per token) plus one unit's full activations while it recomputes
    logits       12 B x vocabulary per labelled text token (bf16 + fp32 logits and their gradients; the LM head
                 runs on labelled positions only) + the same per VAR token over the 4096 codes
    allowance    4 GiB: CUDA context, NCCL buffers, allocator fragmentation

The activation coefficients are measured, not assumed: one LLaMA decoder layer (h = 256, i/h = 11008/4096)
and one VAR block run forward in bf16 on the CPU under saved-tensor hooks, at two sequence lengths; the slope
is the bytes a token leaves for backward (weights' autocast copies excluded by the slope). Attention kernels
save q, k, v, o and the log-sum-exp (flash / memory-efficient SDPA, no L^2 term), as on the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import load_model_cfg, load_stage, parse_args, print_table
from vargpt.model import SpecialTokenIds, build_vargpt
from vargpt.model.var_blocks import AdaLNSelfAttn
from vargpt.training.stage import apply_stage

DEFAULTS: dict[str, Any] = {
    "model": "vargpt_llava_7b",
    "world_size": 8,
    "micro_batch_size": 8,
    "gpu_gib": 80.0,
    "und_seq_len": 2048,  # stage 2 worst case: every row at the cutoff (conf/data/stage2_mix.yaml)
    "und_label_frac": 0.5,  # labelled share of an understanding row's text tokens
    "gen_prompt_len": 64,  # text tokens around a generation block (ImageNet-Instruct prompts and replies)
    "sft_mixed_gen_frac": 0.0,  # generation rows in a stage-2 micro batch (the real mix: 0.4 %)
    "allowance_gib": 4.0,
}
GiB = 2**30


def _saved_bytes(fn: Any) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure_coefficients() -> dict[str, float]:
    """Bytes per token per layer saved for backward, in units of the layer width, bf16 compute."""
    torch.manual_seed(0)
    h, i, B = 256, 688, 2
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    lm = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    layer, rotary = lm.model.layers[0], lm.model.rotary_emb
    block = AdaLNSelfAttn(0, h, h, 4).to(torch.bfloat16)
    out = {}
    for trained in (True, False):
        layer.requires_grad_(trained)
        block.requires_grad_(trained)
        llm, var = [], []
        for T in (64, 128):
            x = torch.randn(B, T, h, dtype=torch.bfloat16, requires_grad=True)
            pe = rotary(x, torch.arange(T)[None])
            cond = torch.randn(B, h, dtype=torch.bfloat16, requires_grad=trained)
            bias = torch.zeros(1, 1, T, T)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                llm.append(_saved_bytes(lambda x=x, pe=pe: layer(x, position_embeddings=pe, attention_mask=None)))
                var.append(_saved_bytes(lambda x=x, c=cond, b=bias: block(x, c, attn_bias=b)))
        key = "trained" if trained else "frozen"
        out[f"llm_{key}"] = (llm[1] - llm[0]) / (B * 64) / h
        out[f"var_{key}"] = (var[1] - var[0]) / (B * 64) / h
    return out


def unit_sizes(model: torch.nn.Module) -> tuple[int, int, list[tuple[torch.nn.Module, int]]]:
    """(root parameters, VQ-VAE parameters, [(unit, parameters)]) of the FSDP2 layout."""
    units = [(u, sum(p.numel() for p in u.parameters())) for u in model.fsdp_units()]
    in_units = {id(p) for u, _ in units for p in u.parameters()}
    vq = {id(p) for p in model.vae_local.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units and id(p) not in vq)
    return root, sum(p.numel() for p in model.vae_local.parameters()), units


def plan(args: dict[str, Any], overrides: list[str]) -> None:
    cfg = load_model_cfg(args["model"], overrides)
    V = cfg.llm.vocab_size
    ids = SpecialTokenIds(image=V - 6, pad=V - 5, gen_start=V - 4, gen_end=V - 3, gen_pad=V - 2, eos=2, bos=1)
    with torch.device("meta"):
        model = build_vargpt(cfg, ids)
    coef = measure_coefficients()
    W, b = int(args["world_size"]), int(args["micro_batch_size"])
    h, n_layers = cfg.llm.hidden_size, cfg.llm.num_hidden_layers
    C, depth = model.vargpt_gen.C, len(model.vargpt_gen.blocks)
    L, P = model.num_gen_tokens, model.num_image_tokens
    V_vq = cfg.vqvae.vocab_size
    root, n_vq, units = unit_sizes(model)
    n_all = sum(p.numel() for p in model.parameters())
    print(
        f"{args['model']}: {n_all / 1e9:.3f} B parameters ({n_vq / 1e6:.1f} M VQ-VAE replicated, root unit "
        f"{root / 1e6:.1f} M, {len(units)} units, largest {max(n for _, n in units) / 1e6:.1f} M); "
        f"{W} GPUs x {args['gpu_gib']:g} GiB, micro batch {b}"
    )
    print(
        "measured activation bytes per token per layer (bf16): LLaMA layer "
        f"{coef['llm_trained']:.1f} h trained / {coef['llm_frozen']:.1f} h frozen; VAR block "
        f"{coef['var_trained']:.1f} C trained / {coef['var_frozen']:.1f} C frozen"
    )
    gen_row = int(args["gen_prompt_len"]) + L + 3
    und_text = int(args["und_seq_len"]) - P
    rows = []
    for stage_name in ("pretrain", "sft_mixed", "sft_gen"):
        stage = load_stage(stage_name)
        apply_stage(model, stage["trainable"], stage_name)
        n_t = sum(p.numel() for p in model.parameters() if p.requires_grad)
        in_units = {id(p) for u, _ in units for p in u.parameters()}
        root_trained = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_units)
        trained_units = [n for u, n in units if any(p.requires_grad for p in u.parameters())] + [root_trained]
        llm_trained = any(p.requires_grad for p in model.language_model.parameters())
        var_trained = any(p.requires_grad for p in model.vargpt_gen.blocks.parameters())
        if stage_name == "sft_mixed":
            n_gen = round(b * float(args["sft_mixed_gen_frac"]))
            n_und = b - n_gen
        else:
            n_gen, n_und = b, 0
        llm_tokens = n_und * int(args["und_seq_len"]) + n_gen * gen_row
        var_tokens = n_gen * L
        labels = n_und * und_text * float(args["und_label_frac"]) + n_gen * 16
        for ac in (True, False):
            weights = 4 * (n_all - n_vq) / W + 4 * n_vq
            gathered = 2 * (root + 2 * max(n for _, n in units))
            grads = 4 * n_t / W + 6 * max(trained_units)
            optim = 8 * n_t / W
            c_llm = coef["llm_trained" if llm_trained else "llm_frozen"] * h
            c_var = coef["var_trained" if var_trained else "var_frozen"] * C
            if ac:
                acts = n_layers * llm_tokens * 2 * h + depth * var_tokens * 2 * C
                # one unit recomputing (the larger of an LLM layer and a VAR block) plus its gradient buffers
                acts += max(llm_tokens * c_llm, var_tokens * c_var) * 1.5
            else:
                acts = n_layers * llm_tokens * c_llm + depth * var_tokens * c_var
                acts += max(llm_tokens * 2 * h, var_tokens * 2 * C) * 4  # gradient buffers of the residual stream
            logits = 12 * (labels * V + var_tokens * V_vq)
            allowance = float(args["allowance_gib"]) * GiB
            total = weights + gathered + grads + optim + acts + logits + allowance
            fits = total <= float(args["gpu_gib"]) * GiB
            rows.append(
                [
                    stage_name,
                    f"{n_t / 1e9:.3f}",
                    "on" if ac else "off",
                    f"{llm_tokens:,}",
                    f"{weights / GiB:.1f}",
                    f"{gathered / GiB:.1f}",
                    f"{grads / GiB:.1f}",
                    f"{optim / GiB:.1f}",
                    f"{acts / GiB:.1f}",
                    f"{logits / GiB:.1f}",
                    f"{total / GiB:.1f}",
                    "yes" if fits else "NO",
                ]
            )
    print_table(
        f"per-GPU memory (GiB) under FSDP2 full sharding over {W} ranks, bf16 compute, fp32 master + AdamW; "
        f"stage 2 rows at {args['und_seq_len']} tokens, generation rows {gen_row} tokens",
        [
            "stage",
            "trainable B",
            "AC",
            "LLM tokens",
            "weights",
            "gathered",
            "grads",
            "AdamW",
            "activations",
            "logits",
            "total",
            "fits",
        ],
        rows,
    )
    print(f"totals include a {args['allowance_gib']:g} GiB allowance (CUDA context, NCCL, fragmentation)")


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv, DEFAULTS, __doc__)
    plan(args, extra["model."])


if __name__ == "__main__":
    main()
