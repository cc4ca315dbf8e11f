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

    from training.config import ConfigError
    from training.methods import load_train_config
    from training.run import USER_ERRORS, run

    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    try:
        cfg = load_train_config(argv, config_file=None if has_config else QUICKSTART)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    try:
        run(cfg)
    except USER_ERRORS as e:  # the message names the problem and the fix; a traceback would only bury it
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
