"""Outputs: curated dataset, removal manifest, per-step stats, dataset card, and the Hub folder / push.

Layout (DESIGN.md): `output.dir/dataset/` (save_to_disk), `output.dir/removed/` (manifest, save_to_disk) and
`output.dir/removed.parquet`, `output.dir/stats.json`, `output.dir/README.md` (dataset card),
`output.dir/hub/` (exactly what `push_to_hub` uploads: README.md + data/train-*.parquet), `output.dir/cache/`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from model_cards import DATASET_CARD, load_template, public_name

from .config import CurateConfig
from .verify import DENSE_KEYPOINTS

MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("step", pa.string()), ("reason", pa.string()),
                             ("duplicate_of", pa.string())])
OUTPUT_COLUMNS = ["id", "source", "path", "sha256", "phash", "width", "height", "cluster", "retrieved_by",
                  "similarity", "image"]


def manifest_table(ids: list[str], step: str, reasons: list[str], duplicate_of: list[str | None]) -> pa.Table:
    return pa.table({"id": ids, "step": [step] * len(ids), "reason": reasons, "duplicate_of": duplicate_of},
                    schema=MANIFEST_SCHEMA)


def save_dataset(ds: datasets.Dataset, path: Path) -> None:
    """`save_to_disk`, loadable also when empty (datasets writes 0 shards for 0 rows, which load_from_disk
    cannot read back)."""
    ds.save_to_disk(str(path), num_shards=1 if len(ds) == 0 else None)


def write_manifest(parts: list[pa.Table], out_dir: Path) -> pa.Table:
    table = pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()
    pq.write_table(table, out_dir / "removed.parquet")
    target = out_dir / "removed"
    shutil.rmtree(target, ignore_errors=True)
    save_dataset(datasets.Dataset(table), target)
    return table


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                        (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "1B<n<10B"


def render_card(cfg: CurateConfig, stats: dict[str, Any], models: dict[str, str]) -> str:
    """The dataset card (`README.md`), built with `huggingface_hub.DatasetCard` from `model_cards/dataset_card.md`.

    Cards are public: sources, seed/eval sets and embedders given as local paths are named by their last
    component only (`model_cards.public_name`); Hub ids stay as they are.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    models = {k: public_name(v) for k, v in models.items()}
    card_data = DatasetCardData(
        license="other",
        task_categories=["image-feature-extraction"],
        size_categories=[size_category(stats["num_rows"])],
        pretty_name=cfg.output.repo_id or f"Curated dataset ({cfg.config_name})",
        tags=["dinoforge", "curation", "lvd-142m", "self-supervised"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
        dinoforge=models,
    )
    rows = "\n".join(f"| {s['step']} | {s['rows_in']} | {s['rows_kept']} | {s['rows_removed']} |"
                     for s in stats["steps"])

    def names(items: list) -> str:
        return ", ".join(
            f"`{s.name}` ({s.dataset if s.dataset else 'local: ' + public_name(s.path)})" for s in items
        ) or "none"

    cd, dc = cfg.dedup.copy_detection, cfg.decontaminate

    def verify(section: Any, joins: str = "") -> str:
        if section.verify_min_inliers is None:
            return ""
        dense = ("" if section.verify_dense_min_inliers is None else
                 f" (or >= {section.verify_dense_min_inliers} with {DENSE_KEYPOINTS} keypoints per image)")
        return (f", or among the {section.verify_top} nearest: >= {section.verify_min_inliers} ORB keypoint matches "
                f"fit one similarity transform (RANSAC){dense}{joins}")

    km = stats.get("cluster") or {}
    values = {
        "title": card_data.pretty_name,
        "num_rows": stats["num_rows"],
        "num_input": stats["steps"][0]["rows_in"] if stats["steps"] else 0,
        "sources": names(cfg.sources),
        "seeds": names(cfg.seeds),
        "eval_sets": names(cfg.eval_sets),
        "step_table": rows,
        "min_size": cfg.validate.min_size,
        "max_aspect": cfg.validate.max_aspect,
        "exact": "sha256 of the file bytes" if cfg.dedup.exact else "off",
        "phash": cfg.dedup.phash_max_distance if cfg.dedup.phash_max_distance is not None else "off",
        "cd_model": models.get("copy_detection", "off"),
        "cd_k": cd.k,
        "cd_threshold": cd.threshold,
        "cd_verify": verify(cd, "; a verified match joins a single image to its most similar matching group "
                                "(groups of several images before lone images), and "
                                "two groups only when it involves two images of each (a collage does not merge its "
                                "sources); a cosine edge between two keypoint-rich images that at most 3 matches "
                                "support is dropped"),
        "dc_verify": verify(dc),
        "dc_model": models.get("decontaminate", "off"),
        "dc_threshold": dc.threshold,
        "embed_model": models.get("embed", "off"),
        "cluster": (f"spherical={cfg.cluster.spherical} k-means, levels {km.get('level_sizes')}, trained on "
                    f"{km.get('train_rows')} of {km.get('rows')} rows (max_points_per_centroid "
                    f"{cfg.cluster.max_points_per_centroid})") if km else "off",
        "select": (f"mode={cfg.select.mode}, k={cfg.select.k}, per_cluster={cfg.select.per_cluster}, "
                   f"min_seed_hits>{cfg.select.min_seed_hits}, cap_per_source={cfg.select.cap_per_source}, "
                   f"target_size={cfg.select.target_size}"),
    }
    return str(DatasetCard.from_template(card_data, template_str=load_template(DATASET_CARD), **values))


def build_hub_folder(ds: datasets.Dataset, card: str, folder: Path, max_shard_size: str,
                     extra_files: list[Path] = ()) -> Path:
    """Write exactly what `push_to_hub` uploads: README.md + data/train-XXXXX-of-YYYYY.parquet (+ the removal
    manifest and stats, outside `data/`, so `load_dataset(repo_id)` reads only the curated rows)."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    size = sum(f["filename"] and Path(f["filename"]).stat().st_size for f in ds.cache_files) or 1
    num_shards = max(1, math.ceil(size / _parse_size(max_shard_size)))
    num_shards = min(num_shards, max(1, len(ds)))
    for i in range(num_shards):
        shard = ds.shard(num_shards=num_shards, index=i, contiguous=True)
        shard.to_parquet(str(folder / "data" / f"train-{i:05d}-of-{num_shards:05d}.parquet"))
    (folder / "README.md").write_text(card)
    for f in extra_files:
        shutil.copy2(f, folder / f.name)
    return folder


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the Hub folder (the only step not exercised offline by the tests)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                             commit_message="dinoforge curate.py")
    return str(getattr(info, "commit_url", info))
