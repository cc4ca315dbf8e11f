"""Typed defaults for `curate.py` (one dataclass per section; YAML and `section.key=value` override them).

The numbers follow the LVD-142M recipe (METHOD.md, "LVD-142M curation"): k = 64 neighbours, cosine 0.6 for
copy detection, 0.45 for eval-set decontamination, k = 4 retrievals per seed image, up to 10,000 images per
cluster with more than 3 seed hits, capped at 1M per source. The thresholds were calibrated for SSCD-style
copy-detection descriptors; with another embedder they are only starting points (the dataset card records
embedder + thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Default embedder for every embedding step. Offline it fails at start-up with a message asking for a local path.
DEFAULT_MODEL = "facebook/dinov2-base"


@dataclass
class SourceConfig:
    """One image collection. Give exactly one of `path` (local folder, parquet/tar shards, `save_to_disk` dir,
    glob) or `dataset` (Hub id)."""

    name: str = ""
    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    image_column: str = "image"
    streaming: bool = False
    # Hub sources only: optional dataset config name and revision.
    config_name: str | None = None
    revision: str | None = None
    # parquet / save_to_disk / Hub rows whose image is only a local path (no bytes) are read only when true: a
    # dataset could name any file (keys, configs) and pull it into a curated, pushed set. URLs are never fetched.
    allow_local_paths: bool = False


@dataclass
class ValidateConfig:
    min_size: int = 64  # shorter side in pixels, after EXIF orientation
    max_aspect: float = 4.0  # longer side / shorter side
    max_pixels: int = 178_956_970  # PIL's decompression-bomb limit (2x its warning threshold)
    # Images already stored as 8-bit RGB/L JPEG/PNG/WebP with no EXIF rotation keep their original bytes;
    # everything else (CMYK, palette, 16-bit, alpha, rotated, other formats) is re-encoded as PNG after
    # normalisation, so downstream readers only ever see upright 8-bit RGB/L.
    reencode_format: Literal["PNG", "JPEG"] = "PNG"
    num_proc: int = 1
    batch_size: int = 64


@dataclass
class CopyDetectionConfig:
    model: str | None = DEFAULT_MODEL  # null: step off
    embedding_column: str | None = None  # precomputed embeddings (take precedence over `model`)
    k: int = 64
    threshold: float = 0.6  # cosine similarity > threshold => duplicate
    batch_size: int = 64
    pooling: Literal["cls", "mean"] = "cls"
    # Keypoint check (curation/verify.py) of each image's `verify_top` nearest neighbours that the threshold did
    # not join: a duplicate when >= verify_min_inliers ORB matches fit one similarity transform (crops, rotations,
    # framing). null: off. Costs an ORB extraction per candidate image and a RANSAC fit per pair.
    verify_min_inliers: int | None = None
    verify_top: int = 10
    # Pairs below this many inliers are checked again with 800 keypoints per image (small crops) and count as
    # duplicates when this many fit. null: off. About 2-3x the time of the check; 20 is the measured setting.
    verify_dense_min_inliers: int | None = None


@dataclass
class DedupConfig:
    exact: bool = True
    # Hamming distance on the 64-bit pHash (also against the horizontally flipped hash); null: off.
    phash_max_distance: int | None = 6
    copy_detection: CopyDetectionConfig = field(default_factory=CopyDetectionConfig)
    # Keep rule inside a duplicate component: largest width*height, then lowest `id` (string order).
    keep: Literal["largest_then_lowest_id"] = "largest_then_lowest_id"


@dataclass
class DecontaminateConfig:
    threshold: float = 0.45
    # null: reuse the copy-detection embedder (no second pass); "none"-like `null` on both turns embedding
    # decontamination off, exact/pHash matches against eval sets still apply when dedup has them on.
    model: str | None = DEFAULT_MODEL
    embedding_column: str | None = None
    k: int = 64
    batch_size: int = 64
    pooling: Literal["cls", "mean"] = "cls"
    # As dedup.copy_detection's: keypoint check of each eval image's `verify_top` nearest pool images. null: off.
    verify_min_inliers: int | None = None
    verify_top: int = 10
    verify_dense_min_inliers: int | None = None


@dataclass
class EmbedConfig:
    model: str | None = DEFAULT_MODEL
    embedding_column: str | None = None
    batch_size: int = 64
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of the on-disk shards
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pooling: Literal["cls", "mean"] = "cls"
    chunk_rows: int = 65_536  # rows per on-disk shard (the unit of resume and of data parallelism)
    device: str | None = None  # default: the accelerate device of this process


@dataclass
class ClusterConfig:
    num_clusters: int = 100_000  # finest level; capped at the number of rows
    levels: int = 1  # > 1: hierarchical k-means, each level clusters the centroids of the level below
    branching: float = 10.0  # hierarchical: level i has num_clusters / branching**i clusters
    niter: int = 20
    nredo: int = 1  # k-means restarts (best objective kept)
    max_points_per_centroid: int = 256  # training subsample = num_clusters * this (reported in stats.json)
    spherical: bool = True
    seed: int = 0
    gpu: bool | None = None  # null: use a GPU when faiss sees one


@dataclass
class SelectConfig:
    # sample: k nearest per seed image; cluster: up to per_cluster from clusters with > min_seed_hits seeds;
    # balanced: hierarchical balanced sampling (no seeds needed); none: keep every deduplicated image.
    mode: Literal["sample", "cluster", "balanced", "none"] = "sample"
    k: int = 4
    per_cluster: int = 10_000
    min_seed_hits: int = 3  # a cluster qualifies with more than this many seed images
    cap_per_source: int = 1_000_000
    target_size: int | None = None  # balanced mode: how many images to keep (null: half of the rows)
    seed: int = 0


@dataclass
class IndexConfig:
    """Faiss kNN index. Exact (flat) search up to `flat_max_rows` rows; above it (type auto) IVF + 4-bit PQ
    fast-scan with exact re-ranking (`ivfpq_fs`, CPU) or IVF-Flat (`ivf`, chosen on GPU). `ivfpq` (8-bit PQ,
    no re-ranking) is the memory-lean option for billions of rows; its similarities are approximate."""

    flat_max_rows: int = 20_000  # exact search costs N^2*d: 20k x 768-d ~ 10 s on 2 CPU cores
    type: Literal["auto", "flat", "ivf", "ivfpq", "ivfpq_fs"] = "auto"
    nlist: int | None = None  # null: ~4*sqrt(N), clipped to [64, 65536]
    nprobe: int = 16
    pq_m: int | None = None  # PQ sub-quantisers (must divide the dimension); null: dim / 8, at least 16
    refine_k_factor: float = 2.0  # ivfpq_fs: re-rank k * this candidates with the fp16 vectors
    # IVF training rows = nlist * this, `train_niter` k-means iterations: coarse centroids only need to be good
    # enough to bucket vectors (re-ranking is exact), so this is far below Faiss' defaults (39 and 25).
    train_points_per_list: int = 16
    train_niter: int = 10
    query_batch: int = 16_384
    gpu: bool | None = None


@dataclass
class OutputConfig:
    dir: str = "outputs/curate"
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    max_shard_size: str = "500MB"
    keep_images: bool = True  # write the image bytes into the curated dataset (false: metadata only)


@dataclass
class CurateConfig:
    config_name: str = "curate"
    sources: list[SourceConfig] = field(default_factory=list)
    seeds: list[SourceConfig] = field(default_factory=list)
    eval_sets: list[SourceConfig] = field(default_factory=list)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
