"""The issue's targets against a results file of the bench scripts (``json=`` lines). Not a test.

    python -m bench.summarize bench_results/results.jsonl

Targets (issue 9, on the card the reference was measured on, an H200): the VAR decoder training step at
>= 1.3x the official code's tokens/s (d16 x 64: 145.6 k, d30 x 16: 31.9 k; bf16 autocast, forward + backward,
no optimizer), MFU >= 50 % for d30; the full VARGPT step (stage 3 trainable set) at >= 45 % MFU. Rows measured
on another card are listed but their ratio to the H200 reference is only indicative. Class-conditional sampling
(``bench.generate parts=var``, issue 19) against the official VAR code on an H200: VAR.sample + VQ-VAE decode,
d16 152 ms at batch 1 and 146 img/s at batch 64, d30 239 ms and 58.8 img/s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VAR_REF = {(16, 64): 145.6e3, (30, 16): 31.9e3}
FACTOR = 1.3
# Official VAR sampling on an H200 (random weights, autocast, KV cache): (depth, batch) -> (latency ms, img/s).
SAMPLE_REF = {(16, 1): (152.0, 6.6), (16, 64): (438.0, 146.0), (30, 1): (239.0, 4.2), (30, 64): (1088.0, 58.8)}


def load(path: str) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    rows = load(argv[0])
    print("== VAR decoder training step (target: >= 1.3x the official tokens/s; d30 MFU >= 50 %)")
    for r in rows:
        if r.get("bench") != "var_step" or (r["depth"], r["batch"]) not in VAR_REF or r.get("encode"):
            continue
        ref = VAR_REF[(r["depth"], r["batch"])]
        ratio = r["tokens_per_s"] / ref
        verdict = "MET" if ratio >= FACTOR else "not met"
        print(
            f"  d{r['depth']} x {r['batch']} ({r['device']}, {r['precision']}, compile={r['compile']}, "
            f"optimizer={r['optimizer']}): {r['tokens_per_s'] / 1e3:.1f} k tok/s = {ratio:.2f}x ref [{verdict}], "
            f"MFU {r['mfu_pct']:.1f} % exact / {r['mfu6n_pct']:.1f} % in the reference's 6N convention"
        )
    print("== VARGPT training step (target: stage 3 >= 45 % MFU)")
    for r in rows:
        if r.get("bench") != "train_step":
            continue
        over = " ".join(r.get("model_overrides") or [])
        print(
            f"  {r['model']} {over} stage {r['stage_name']} mbs {r['micro_batch_size']} {r['precision']} "
            f"AC={r['activation_checkpointing']} compile={r['compile']} codes={r['codes']} ({r['device']}): "
            f"{r['step_ms']:.1f} ms/step, {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tok/s, "
            f"MFU {r['mfu_pct']:.1f} %, peak {r['peak_gib']:.2f} GiB"
        )
    print("== class-conditional sampling (official on an H200: d16 152 ms / 146 img/s at 64; d30 239 ms / 58.8 img/s)")
    for r in rows:
        if r.get("bench") != "generate_var":
            continue
        depth = int(str(r["var"]).removeprefix("d")) if str(r["var"]).startswith("d") else None
        ref = SAMPLE_REF.get((depth, r["batch"]))
        vs = f" = {r['img_s'] / ref[1]:.2f}x the official img/s ({ref[0]:.0f} ms, {ref[1]} img/s)" if ref else ""
        print(
            f"  {r['var']} batch {r['batch']} scale step {r.get('scale_step', 'plain')} ({r['device']}, "
            f"{r['precision']}): {r['latency_ms']:.1f} ms, {r['img_s']:.2f} img/s{vs}"
        )
    print("== VQ-VAE")
    for r in rows:
        if r.get("bench") == "vqvae":
            print(
                f"  {r['config']} batch {r['batch']} ({r['device']}, decode {r['precision']}): encode "
                f"{r['encode_img_s']:.1f} img/s, decode {r['decode_img_s']:.1f} img/s"
            )


if __name__ == "__main__":
    main()
