"""Train a GPT-2 text classifier: python train.py [model=gpt2-medium] [trainer.accelerator=gpu] [experiment=fast] ..."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from spamclf.moved_keys import moved_key_error
from spamclf.pipeline import main as run_pipeline


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_pipeline(cfg)


if __name__ == "__main__":
    if error := moved_key_error(sys.argv[1:]):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
