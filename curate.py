"""Curate an image collection into a `datasets` dataset (LVD-142M recipe).

    python curate.py --config configs/curate.yaml [section.key=value ...]
    accelerate launch curate.py --config configs/curate.yaml      # embedding steps data-parallel
"""

import sys

from curation import CurateConfig, CurationError, run_pipeline
from training.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(CurateConfig, sys.argv[1:] if argv is None else argv)
        stats = run_pipeline(config)
    except (ConfigError, CurationError) as e:
        print(f"curate.py: error: {e}", file=sys.stderr)
        return 2
    if stats:
        print(f"curated {stats['num_rows']} images, removed {stats['num_removed']} -> {config.output.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
