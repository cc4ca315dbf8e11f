"""Frozen-feature evaluation of a backbone: k-NN (k = 10/20/100/200, T = 0.07) and linear probes.

    python probe.py --model outputs/vitl14/backbone --dataset my-org/labelled --output_dir outputs/probe
    python probe.py --zero_shot --model outputs/lit/aligned --dataset my-org/labelled --output_dir outputs/zs

`--zero_shot` scores an image-text model (a text-alignment run's `aligned/` folder, any stock dual encoder)
instead: class names in CLIP's prompt templates, top-1/top-5 on the test split, into results.json.

Writes `OUTPUT_DIR/results.json` (accuracies in percent), `OUTPUT_DIR/details.json` (splits, classes, chosen
linear-probe settings) and prints a table. Features are cached (keyed by the model's weights, the dataset and
the preprocessing; least recently used entries are evicted beyond --cache_max_gb), so a re-run does not recompute
them. All logic lives in the `training.evaluation` package; this script only turns flags into a `ProbeConfig`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training.evaluation import (  # noqa: E402
    DEFAULT_CACHE_MAX_BYTES,
    KNN_KS,
    KNN_TEMPERATURE,
    EvaluationError,
    LinearProbeConfig,
    ProbeConfig,
    ZeroShotConfig,
    default_cache_dir,
    format_results_table,
    format_zero_shot_table,
    run_probe,
    run_zero_shot,
)
from training.model_card import update_model_card  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder or Hub id (anything AutoModel.from_pretrained loads)")
    p.add_argument("--dataset", required=True,
                   help="labelled dataset: Hub id, image folder, save_to_disk dir, ... or 'sample'")
    p.add_argument("--output_dir", required=True, help="where results.json is written")
    p.add_argument("--train_split", default="train")
    p.add_argument("--test_split", default="test")
    p.add_argument("--val_split", default=None,
                   help="split for the linear-probe grid search (default: a seeded 10%% of the train split)")
    p.add_argument("--image_column", default="image")
    p.add_argument("--label_column", default="label")
    p.add_argument("--image_size", type=int, default=None,
                   help="crop size override (multiple of the patch size); resize keeps the processor's 256/224 ratio")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: min(8, CPUs))")
    p.add_argument("--cache_dir", default=None, help=f"feature cache (default: {default_cache_dir()})")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--clear_cache", action="store_true", help="delete the cached features before running")
    p.add_argument("--cache_max_gb", type=float, default=DEFAULT_CACHE_MAX_BYTES / 2**30,
                   help="size limit of the feature cache in GiB; least recently used entries are deleted beyond it "
                        "(0: no limit; default %(default)g)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype of the forward passes (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KNN_KS))
    p.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    p.add_argument("--linear_epochs", type=int, default=LinearProbeConfig.epochs)
    p.add_argument("--export_classifier", action="store_true",
                   help="also save the CLS+mean-patch head as a stock Dinov2ForImageClassification "
                        "in OUTPUT_DIR/classifier")
    p.add_argument("--update_model_card", action="store_true",
                   help="write the results into the model-index of MODEL/README.md (local model folders)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--zero_shot", action="store_true",
                   help="zero-shot classification of an image-text model (e.g. an aligned/ export) with class-name "
                        "prompts, instead of the k-NN / linear probes")
    p.add_argument("--templates", default="clip", choices=["clip", "simple"],
                   help="--zero_shot prompt templates: CLIP's 7-template ensemble, or 'a photo of a {}.'")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="--zero_shot: allow the model folder's own code (not needed for dinoforge exports)")
    return p


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    if args.cache_max_gb < 0:
        raise EvaluationError(f"--cache_max_gb must be >= 0 (0: no limit), got {args.cache_max_gb}")
    return ProbeConfig(
        model=args.model, dataset=args.dataset, output_dir=args.output_dir,
        train_split=args.train_split, test_split=args.test_split, val_split=args.val_split,
        image_column=args.image_column, label_column=args.label_column, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=args.cache_dir,
        use_cache=not args.no_cache, clear_cache=args.clear_cache,
        cache_max_bytes=int(args.cache_max_gb * 2**30) if args.cache_max_gb > 0 else None,
        device=args.device, dtype=args.dtype, ks=tuple(args.ks), temperature=args.temperature,
        linear=LinearProbeConfig(epochs=args.linear_epochs), export_classifier=args.export_classifier,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.update_model_card and not Path(args.model).is_dir():  # fail before the features are computed
        print(f"probe.py: error: --update_model_card needs a local model folder, got {args.model!r}", file=sys.stderr)
        return 2
    try:
        if args.zero_shot:
            results = run_zero_shot(ZeroShotConfig(
                model=args.model, dataset=args.dataset, output_dir=args.output_dir, train_split=args.train_split,
                test_split=args.test_split, image_column=args.image_column, label_column=args.label_column,
                templates=args.templates, batch_size=args.batch_size, num_workers=args.num_workers or 0,
                device=args.device, trust_remote_code=args.trust_remote_code,
            ))
            table = format_zero_shot_table(results)
        else:
            results = run_probe(config_from_args(args)).results
            table = format_results_table(results)
    except EvaluationError as e:
        print(f"probe.py: error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {Path(args.output_dir) / 'results.json'}")
    if args.update_model_card:
        print(f"updated {update_model_card(args.model, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
