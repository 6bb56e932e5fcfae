# VARGPT framework: every target sets itself up (a .venv beside this file) and is safe to re-run.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
STAGE     ?= pretrain
ARGS      ?=
LOG_DIR   ?= logs
BB_LOG    ?= logs/backbones
BB_OUT    ?= backbones/shapes
BB_THREADS ?= $(shell n=$$(nproc); echo $$(( n > 2 ? n / 2 : 1 )))
BB_ALL_THREADS ?= $(shell nproc)
# The generation parts' convolutions run 1.7x faster under bf16 autocast on a CPU with AVX512-BF16 (the
# quantiser stays fp32); use 32-true on a CPU without it.
BB_GEN_PRECISION ?= bf16-mixed
# The demo's stage 2 runs 4x the preset's 4000 samples: its image loss is what teaches the LLM to carry the prompt
# to the VAR (text-to-image both right 4 % -> 12 % measured; docs/backbones.md).
DEMO_STAGE2_SAMPLES ?= 16000
# The stage-0 recipes run at their own (CPU-sized) budgets: no experiment preset.
# They start from nothing: the world's own tokenizer, no initial weights.
BB_TRAIN   = $(BIN)/python src/train.py '~experiment' paths.log_dir=$(BB_LOG) trainer.enable_progress_bar=false \
	model.tokenizer=null model.init_from=null

.DEFAULT_GOAL := help
.PHONY: help install test test-slow lint demo demo-dpo train backbones bb-vqvae bb-und bb-var mlflow-ui clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev extras (idempotent)

test: $(STAMP) ## run the fast test suite (what CI runs)
	$(BIN)/python -m pytest

test-slow: $(STAMP) ## run the slow tests too (multi-process, full demo)
	$(BIN)/python -m pytest -m 'slow or not slow'

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests data_prep bench
	$(BIN)/ruff format --check src tests data_prep bench

# A stage that fails or is preempted (src/train.py exits 1, or 143 after SIGTERM) stops the demo there; the
# same `make demo` resumes it. make itself then exits 2: a scheduler script should call src/train.py directly.
demo: $(STAMP) ## the three VARGPT stages on the embedded default (tiny model, shapes world), then evaluation
	$(BIN)/python src/train.py stage=pretrain paths.log_dir=$(LOG_DIR) $(ARGS)
	$(BIN)/python src/train.py stage=sft_mixed stage.num_samples=$(DEMO_STAGE2_SAMPLES) paths.log_dir=$(LOG_DIR) $(ARGS)
	$(BIN)/python src/train.py stage=sft_gen paths.log_dir=$(LOG_DIR) $(ARGS)
	$(BIN)/python src/eval.py paths.log_dir=$(LOG_DIR) ckpt=$$($(BIN)/python -c \
		"import json; print(json.load(open('$(LOG_DIR)/stages/sft_gen.json'))['export_dir'])")

# The self-improving loop (VARGPT-v1.1's preference stage on the shapes world; docs/backbones.md "Self-improving
# loop"): stage 3's images for DPO_INSTRUCTIONS training instructions, DPO_SAMPLES each, ranked by the world's judge,
# become chosen / rejected pairs; the reference log-probs are precomputed into them; stage=dpo_gen trains on them
# from the model that drew them (the export, not stage 3's fp32 checkpoint: the policy starts as its reference);
# the held-out split is evaluated as `make demo` evaluates stage 3.
DPO_DIR          ?= $(LOG_DIR)/dpo
DPO_INSTRUCTIONS ?= 600
DPO_SAMPLES      ?= 8
# The chosen image must have every asked object's colour and shape right (the headline figure); see docs/backbones.md.
DPO_PAIRS_ARGS   ?= --chosen-needs both
DPO_ARGS         ?= stage.num_samples=2400 stage.global_batch_size=16 stage.optimizer.lr=1e-4 \
	stage.preference.beta=0.1 stage.preference.ftx=1.0
STAGE3_EXPORT     = $$($(BIN)/python -c "import json; print(json.load(open('$(LOG_DIR)/stages/sft_gen.json'))['export_dir'])")
demo-dpo: $(STAMP) ## after `make demo`: sample, judge, pair, DPO (stage=dpo_gen), evaluate
	$(BIN)/python -m vargpt.preference.self_improve --ckpt $(STAGE3_EXPORT) --out $(DPO_DIR)/pairs \
		--instructions $(DPO_INSTRUCTIONS) --samples $(DPO_SAMPLES) $(DPO_PAIRS_ARGS)
	$(BIN)/python -m vargpt.preference.reference_logps --input $(DPO_DIR)/pairs --weights $(STAGE3_EXPORT) \
		--gen-codes --out $(DPO_DIR)/pairs_ref --overwrite
	$(BIN)/python src/train.py stage=dpo_gen stage.init_from=$(STAGE3_EXPORT) paths.log_dir=$(LOG_DIR) data.root=$(DPO_DIR) \
		data.train_sources.preference.path=pairs_ref data.gen_codes=true data.gen_resize_ratio=1.0 \
		data.num_workers=2 $(DPO_ARGS) $(ARGS)
	$(BIN)/python src/eval.py paths.log_dir=$(LOG_DIR) ckpt=$$($(BIN)/python -c \
		"import json; print(json.load(open('$(LOG_DIR)/stages/dpo_gen.json'))['export_dir'])")

train: $(STAMP) ## one stage: make train STAGE=pretrain ARGS='trainer=gpu'
	$(BIN)/python src/train.py stage=$(STAGE) paths.log_dir=$(LOG_DIR) $(ARGS)

# The VQ-VAE and the understanding chain run side by side, each on half the cores (one thread each on 2 cores:
# two busy 2-thread processes on 2 cores spin in OpenMP barriers and run several times slower); the VAR, which
# needs the VQ-VAE, then has all the cores.
bb-vqvae: $(STAMP)  # the multi-scale VQ-VAE
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_vqvae trainer.precision=$(BB_GEN_PRECISION) $(ARGS)

bb-var: $(STAMP)  # the class-conditional VAR on the VQ-VAE's codes
	OMP_NUM_THREADS=$(BB_ALL_THREADS) $(BB_TRAIN) stage=world_var trainer.precision=$(BB_GEN_PRECISION) $(ARGS)

bb-und: $(STAMP)  # understanding parts and the judge: CLIP vision tower, LLM, open_clip judge, then LLaVA's two stages
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_vision $(ARGS)
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_lm $(ARGS)
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_clip $(ARGS)
	$(BIN)/python -m vargpt.backbones.assemble parts --log-dir $(BB_LOG) --out $(BB_LOG)/parts
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_llava_align model.init_from=$(BB_LOG)/parts $(ARGS)
	OMP_NUM_THREADS=$(BB_THREADS) $(BB_TRAIN) stage=world_llava_sft $(ARGS)

backbones: $(STAMP) ## retrain the shapes world's pretrained parts (stage-0 recipes) into backbones/shapes
	$(MAKE) -j2 bb-vqvae bb-und ARGS="$(ARGS)"
	$(MAKE) bb-var ARGS="$(ARGS)"
	$(BIN)/python -m vargpt.backbones.assemble final --log-dir $(BB_LOG) --out $(BB_OUT) \
		--command "make backbones ARGS='$(ARGS)'"

mlflow-ui: $(STAMP) ## browse runs at http://127.0.0.1:5000 (local only)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(LOG_DIR))/mlflow.db

clean: ## remove the venv, logs and caches (keeps committed backbones)
	rm -rf $(VENV) $(LOG_DIR) outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
