"""LVD-142M-style data curation as `datasets` steps + Faiss (DESIGN.md "curation/", METHOD.md).

    from curation import CurateConfig, run_pipeline
    from training.config import load_config
    stats = run_pipeline(load_config(CurateConfig, ["--config", "configs/curate.yaml"]))

Steps (each cached under `output.dir/cache/` and resumable; counts in `stats.json`, removals in the manifest):
ingest (ingest.py) -> validate + hashes (validate.py) -> exact / pHash dedup (graph.py) -> copy-detection
embeddings (embed.py) + Faiss kNN (index.py) + union-find components + keep rule (graph.py) -> eval-set
decontamination -> retrieval embeddings -> k-means (cluster.py) -> selection (selection.py) -> outputs, dataset
card and Hub folder (output.py), published atomically into `output.dir` (outdir.py); pipeline.py wires them.

Decisions (recorded in the dataset card where they affect the data):
- Row id = `<source>/<path in source>` (folders, webdataset keys) or `<source>/<row index:09d>`.
- Every entry of a source is a row: one that cannot be read (broken or looping link, FIFO, device, folder named
  like a file, unreadable, vanished, changed, a path-only row of an untrusted dataset) is removed with its reason;
  `stats.json`: `entries_listed` = `num_rows` + `num_removed`. Symbolic links are followed, out of the folder too,
  never round a loop; hidden entries are skipped and counted.
- Keep rule in a duplicate component: largest width*height, then lowest id (string order).
- pHash: 64-bit DCT hash of the normalised image, Hamming distance <= `dedup.phash_max_distance` (6),
  also against the mirrored image's hash so horizontal flips match; exact multi-index search.
- Decontamination drops the representative of every component (exact + pHash + copy-detection edges)
  that touches an eval image, by exact bytes, pHash, or cosine > `decontaminate.threshold`.
- Embeddings: L2-normalised CLS/pooler output (or mean of patch tokens), stored fp16 in chunked Arrow files;
  the retrieval step reuses the copy-detection embeddings when both use the same model.
- kNN: exact below `index.flat_max_rows`, else IVF + 4-bit PQ fast-scan with exact fp16 re-ranking (CPU),
  IVF-Flat on GPU, or IVF-PQ re-ranked from the on-disk store (memory-lean).
"""

from .common import CurationError
from .config import (
    ClusterConfig,
    CopyDetectionConfig,
    CurateConfig,
    DecontaminateConfig,
    DedupConfig,
    EmbedConfig,
    IndexConfig,
    OutputConfig,
    SelectConfig,
    SourceConfig,
    ValidateConfig,
)
from .pipeline import run_pipeline

__all__ = [
    "ClusterConfig",
    "CopyDetectionConfig",
    "CurateConfig",
    "CurationError",
    "DecontaminateConfig",
    "DedupConfig",
    "EmbedConfig",
    "IndexConfig",
    "OutputConfig",
    "SelectConfig",
    "SourceConfig",
    "ValidateConfig",
    "run_pipeline",
]
