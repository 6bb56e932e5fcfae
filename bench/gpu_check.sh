#!/usr/bin/env bash
# One-shot GPU performance check for a session with a lent GPU (fits in one 10-minute command).
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT if set, else bench_results
#   BUDGET_S=300 bash bench/gpu_check.sh       # stop starting new steps after 300 s
#
# Needs only python3 with torch, transformers, PyYAML (and lightning for activation checkpointing): no network,
# no install. It runs from the repository root with PYTHONPATH=src (python -m bench.<name>); the bench scripts read the model YAML with
# PyYAML when omegaconf is missing (the GPU image has no hydra-core/omegaconf/webdataset/mlflow/open_clip; to
# use data=shapes there, carry those wheels, see /work/.library/device/README.md).
#
# Steps, in priority order (each under its own timeout, skipped when the budget is spent):
#   1. VAR decoder step, d16 x 64 and d30 x 16, bf16 autocast, forward + backward, no optimizer (the issue's
#      reference setting), eager; then with AdamW (fused) as a real step
#   2. VARGPT tiny, three stages, bf16-mixed, with the host-sync count of one step
#   3. VARGPT mid-size (bench/configs/mid.yaml, 0.8 B), stages 2 and 3, bf16-mixed, micro batch 8; stage 3 again
#      with precomputed codes + fused AdamW
#   4. VARGPT 7B widths, stage 3 trainable set, LLM reduced to 16 of 32 layers (one GPU), micro batch 4,
#      activation checkpointing on and off
#   5. VARGPT 7B widths, stage 2, LLM reduced to 8 layers, 4 x 2048-token understanding rows, AC on (compare the
#      per-layer MFU with the Llama-7B reference: 37 % at 4 x 2048 with gradient checkpointing)
#   6. VQ-VAE encode/decode, tiny and ch160, batches 1/8/32
#   7. VAR decoder step with torch.compile
#   8. bench/generate.py (if present): class-conditional VAR-d16 sampling, VARGPT tiny image/text generation;
#      the sampler under CUDA graphs (scale step compiled with mode reduce-overhead, one graph per scale) at
#      VAR-d16 and d30, batches 1 and 64, against the official figures (d16 152 ms at batch 1, 146 img/s at 64;
#      d30 239 ms, 58.8 img/s)
#   9. summary against the targets (bench/summarize.py)
# Results: OUT_DIR/results.jsonl (one JSON line per table row), OUT_DIR/gpu_check.log (all output).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench_results}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
R="$OUT_DIR/results.jsonl"
LOG="$OUT_DIR/gpu_check.log"
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 30)); then
    echo "=== SKIP $name: budget spent" | tee -a "$LOG"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, t=$(($(date +%s) - START))s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, t=$(($(date +%s) - START))s" | tee -a "$LOG"
  # the last table of the step, for the command's own output
  tail -n 12 "$LOG" | grep -v '^===' || true
  return 0
}

{
  echo "gpu_check $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
  $PY -c "import omegaconf" 2>/dev/null && echo "omegaconf: yes" || echo "omegaconf: no (PyYAML fallback)"
} 2>&1 | tee -a "$LOG"

step var_eager 120 $PY -m bench.var_step configs=d16:64,d30:16 precision=bf16-mixed steps=10 warmup=3 json="$R"
step var_adamw 90 $PY -m bench.var_step configs=d16:64,d30:16 precision=bf16-mixed optimizer=true fused_adam=true \
  steps=8 warmup=3 json="$R"
step tiny 60 $PY -m bench.train_step model=tiny precision=bf16-mixed stage=pretrain,sft_mixed,sft_gen steps=10 warmup=3 \
  sync_debug=true json="$R"
step mid 120 $PY -m bench.train_step model=bench/configs/mid.yaml precision=bf16-mixed stage=sft_mixed,sft_gen \
  micro_batch_size=8 steps=8 warmup=3 show_flops=true json="$R"
step mid_codes 60 $PY -m bench.train_step model=bench/configs/mid.yaml precision=bf16-mixed stage=sft_gen \
  micro_batch_size=8 codes=true fused_adam=true steps=8 warmup=3 sync_debug=true show_flops=false json="$R"
step 7b_sft_gen 150 $PY -m bench.train_step model=vargpt_llava_7b model.llm.num_hidden_layers=16 precision=bf16-mixed \
  stage=sft_gen micro_batch_size=4 activation_checkpointing=true,false steps=6 warmup=2 json="$R"
step 7b_sft_mixed 90 $PY -m bench.train_step model=vargpt_llava_7b model.llm.num_hidden_layers=8 precision=bf16-mixed \
  stage=sft_mixed gen_frac=0 seq_len=2048 micro_batch_size=4 activation_checkpointing=true steps=6 warmup=2 \
  show_flops=false json="$R"
step vqvae 60 $PY -m bench.vqvae config=tiny,ch160 batch_sizes=1,8,32 precision=bf16-mixed json="$R"
step var_compile 180 $PY -m bench.var_step configs=d16:64,d30:16 precision=bf16-mixed compile=model steps=10 warmup=3 \
  json="$R"
if [ -f bench/generate.py ]; then
  step generate_var 90 $PY -m bench.generate parts=var var=d16 precision=bf16-mixed batch_sizes=1,16,64 json="$R"
  for d in d16 d30; do
    step "sampler_graphs_$d" 180 $PY -m bench.generate parts=var var=$d precision=bf16-mixed batch_sizes=1,64 \
      scale_step=fast,cudagraphs warmup=3 repeats=5 json="$R"
  done
  step generate_tiny 60 $PY -m bench.generate parts=images,text precision=bf16-mixed batch_sizes=1,16 json="$R"
fi
step mid_compile 120 $PY -m bench.train_step model=bench/configs/mid.yaml precision=bf16-mixed stage=sft_gen \
  micro_batch_size=8 compile=true steps=8 warmup=3 show_flops=false json="$R"

echo "=== summary" | tee -a "$LOG"
$PY -m bench.summarize "$R" 2>&1 | tee -a "$LOG"
echo "=== done in $(($(date +%s) - START)) s; results: $R, log: $LOG" | tee -a "$LOG"
