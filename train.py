"""Pretrain a backbone: `accelerate launch train.py [--config FILE.yaml] [section.key=value ...]`.

The config's `method` (default `dinov2`) picks what is trained (see training/methods/). With no `--config` it
trains the quickstart recipe (configs/quickstart.yaml) on the bundled sample images.
`python train.py export CHECKPOINT OUT` writes `OUT/pretraining/` and `OUT/backbone/` from any checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def main(argv: list[str]) -> None:
    if argv[:1] == ["export"]:
        if len(argv) != 3:
            sys.exit("usage: python train.py export CHECKPOINT OUT")
        from training.export import export_checkpoint

        paths = export_checkpoint(argv[1], argv[2])
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        return

    from training.methods import load_train_config
    from training.run import run_cli

    run_cli(argv, QUICKSTART, lambda args, config_file: load_train_config(args, config_file=config_file))


if __name__ == "__main__":
    main(sys.argv[1:])
