"""Train a GPT-2 text classifier: python train.py [model=gpt2-medium] [trainer.accelerator=gpu] [experiment=fast] ..."""

import hydra
from omegaconf import DictConfig

from spamclf.pipeline import main as run_pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_pipeline(cfg)


if __name__ == "__main__":
    main()
