"""Distil a big model into small ones: `accelerate launch distill.py [--config FILE.yaml] [section.key=value ...]`.

The same loop, outputs and conventions as train.py, with a `teacher` and `students` section. `method` picks the
recipe: `distill_dino` (default; the paper's: a frozen DINOv2 teacher *with heads* — a run's `pretraining/` folder
— into students of our ViT, exported as their EMA) or `distill_features` (any AutoModel / timm backbone as teacher,
students of any architecture, CNNs included). With no `--config` it runs configs/distill_quickstart.yaml, which
distils the quickstart run's teacher (`outputs/quickstart/pretraining`, written by `accelerate launch train.py`).
`python distill.py export CHECKPOINT OUT` writes the students' `backbone/` folders from any checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent / "configs" / "distill_quickstart.yaml"
METHODS = ("distill_dino", "distill_features")


def main(argv: list[str]) -> None:
    if argv[:1] == ["export"]:
        from train import main as train_main

        return train_main(argv)

    from training.config import ConfigError, load_config, peek
    from training.methods import get_method
    from training.run import run_cli

    def load(args: list[str], config_file: Path | None):
        method = peek(args, "method", config_file) or METHODS[0]
        if method not in METHODS:
            raise ConfigError(f"distill.py runs {' or '.join(METHODS)}, got method={method!r}; train it with train.py")
        return load_config(get_method(method).config_class, args, config_file)

    run_cli(argv, QUICKSTART, load)


if __name__ == "__main__":
    main(sys.argv[1:])
