"""Evaluate a VARGPT: the shapes world's held-out split (default) and lmms-eval's benchmarks from local files.

    python src/eval.py                                                  # random tiny model, shapes world
    python src/eval.py ckpt=logs/runs/<run>/export                      # a trained model, shapes world
    python src/eval.py ckpt=/models/VARGPT_LLaVA-7B benchmarks=[pope,mme,vqav2] data_root=/data/lmms-lab \
        limit=500 batch_size=16 device=cuda dtype=bfloat16
    python src/eval.py ckpt=... benchmarks=[shapes] clip.weights=backbones/world_clip.safetensors

Writes <out_dir>/<benchmark>/{predictions.jsonl,scores.json,run.json} (rerun the same command to resume an
interrupted run; predictions made with other settings or benchmark files are refused, naming what differs), logs
the scores and files to MLflow (paths.log_dir/mlflow.db) and prints a table. Benchmarks are asked and scored as
lmms-eval's VARGPT wrapper does: docs/evaluation.md. The logic lives in vargpt.eval.runner; the config is
conf/eval.yaml.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vargpt.cli_config import NON_SCHEMA_GROUPS, EvalConfig
from vargpt.config import refuse_extra_keys, register_configs, unknown_override_key
from vargpt.eval.runner import run

register_configs()  # eval_schema, and the vargpt_hash resolver used by run_name
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    refuse_extra_keys(cfg, EvalConfig)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run(cfg, overrides)


if __name__ == "__main__":
    if problem := unknown_override_key(sys.argv[1:], EvalConfig, NON_SCHEMA_GROUPS):
        sys.exit(problem)
    main()
