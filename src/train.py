"""Train one VARGPT stage: compose the config, build everything from it, fit.

    python src/train.py stage=pretrain                      # stage 1 on the embedded default (tiny, shapes, CPU)
    python src/train.py stage=sft_mixed                     # stage 2, from stage 1's final checkpoint
    python src/train.py stage=sft_gen                       # stage 3, from stage 2's
    python src/train.py stage=sft_gen trainer=gpu           # one GPU, bf16
    python src/train.py stage=sft_gen trainer=fsdp          # FSDP2 over all local GPUs (also torchrun/srun)
    python src/train.py experiment=vargpt_v1 stage=sft_gen data=stage3_gen   # the paper's 7B recipe, 8 GPUs
    python src/train.py -m stage.optimizer.lr=1e-4,3e-4 data.micro_batch_size=8,16   # a sweep, one MLflow run each
    python src/train.py stage=pretrain resume=false         # start over instead of continuing (resume=auto)
    python src/train.py stage=sft_gen --cfg job             # print the composed config

Everything lands under paths.log_dir (default logs/): runs/<run_name>/ (checkpoints, export, summary) and
mlflow.db (make mlflow-ui). See conf/train.yaml for the groups and src/vargpt/config.py for every key.

Exit status: 0 done, 1 failed, 143 preempted (SIGTERM: saved at the next optimizer step; the same command
resumes). Rerunning a completed run's command finishes whatever an interrupted end left out. docs/faults.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from vargpt.backbones.app import APP as RECIPE_APP
from vargpt.config import register_configs, unknown_override_key
from vargpt.training.task import run
from vargpt.training.vargpt_app import APP as VARGPT_APP

# The apps this entry point trains: each registers the stages it trains on import (vargpt.training.app).
APPS = (VARGPT_APP, RECIPE_APP)

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    if problem := unknown_override_key(sys.argv[1:]):
        sys.exit(problem)
    main()
