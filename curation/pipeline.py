"""The curation pipeline: ingest -> validate -> exact / perceptual / copy-detection dedup -> decontaminate ->
retrieval embeddings -> k-means -> selection -> outputs.

Row index space: after validation every row of the validated dataset `V` has an index; each dedup stage works
on the rows still alive and records `rep[i]` (the row that represents i's duplicate component). Composing the
stages gives every row's final representative, which is what "drop the whole component that touches an eval
image" needs: a hit on any member, even one removed earlier, drops its representative.

Caching / resume: `datasets` maps get `new_fingerprint` values derived from the step config and the input key
(never from hashing a closure that holds a model); graph steps write their decisions to
`cache/steps/<step>-<key>/` (atomic rename); embeddings go to chunked on-disk stores. A re-run after a kill
reuses every finished piece and produces the same output.

Outputs: written to a staging folder and published with one atomic rename (`curation.outdir`): a kill leaves the
previous complete output or the new one in `output.dir`, never a mix. `stats.json` accounts for every entry:
`entries_listed` (every entry of every source) = `num_rows` (kept) + `num_removed` (manifest rows), checked by
`check_invariants` before anything is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from training.config import save_config
from training.data.decode import decode_image

from .cluster import KMEANS_ALGORITHM, KMeansResult, cluster_store
from .common import CurationError, DistState, StepCache, fingerprint, kill_point, read_json, write_json
from .config import CurateConfig, SourceConfig
from .distributed import Comm
from .embed import EmbeddingStore, EmbedSpec, ModelRef, embed_dataset, resolve_model
from .graph import (
    connected_components,
    contaminated_components,
    dedup_from_edges,
    exact_edges,
    hamming_pairs,
    hex_to_uint64,
    id_ranks,
    knn_edges,
    phash_edges,
)
from .index import knn_search
from .ingest import check_sources, ingest_all
from .outdir import OutputDir
from .output import (
    OUTPUT_COLUMNS,
    build_hub_folder,
    manifest_table,
    push_folder,
    render_card,
    save_dataset,
    write_manifest,
)
from .selection import select_rows
from .validate import validate_batch
from .verify import candidate_pairs, collage_safe_joins, geometric_veto, unique_pairs, verify_pairs

META_COLUMNS = ["id", "source", "sha256", "phash", "phash_flip", "width", "height"]


@contextlib.contextmanager
def main_first(dist: DistState) -> Iterator[None]:
    """Main process runs the block first (writes caches), the others then find them."""
    if not dist.is_main:
        dist.barrier()
    yield
    if dist.is_main:
        dist.barrier()


def check_config(cfg: CurateConfig) -> None:
    if not cfg.sources:
        raise CurationError("no sources: add at least one entry to `sources` (name + path or dataset)")
    check_sources(cfg.sources, "sources")
    check_sources(cfg.seeds, "seeds")
    check_sources(cfg.eval_sets, "eval_sets")
    all_names = [s.name for s in cfg.sources + cfg.seeds + cfg.eval_sets]
    dupes = sorted({n for n in all_names if all_names.count(n) > 1})
    if dupes:
        raise CurationError(f"source names {dupes} are used in more than one of sources/seeds/eval_sets; "
                            f"rename them so row ids stay unique")
    if cfg.output.push and not cfg.output.repo_id:
        raise CurationError("output.push=true needs output.repo_id (e.g. my-org/my-curated-images)")
    mode = cfg.select.mode
    if mode in ("sample", "cluster") and not cfg.seeds:
        raise CurationError(f"select.mode={mode} retrieves with seed images but `seeds` is empty; add seed "
                            f"sources or use select.mode=balanced (no seeds) or select.mode=none")
    if mode in ("sample", "cluster", "balanced") and cfg.embed.model is None and cfg.embed.embedding_column is None:
        raise CurationError(f"select.mode={mode} needs retrieval embeddings: set embed.model (or "
                            f"embed.embedding_column), or use select.mode=none")
    if mode in ("cluster", "balanced") and cfg.cluster.num_clusters < 1:
        raise CurationError(f"select.mode={mode} needs k-means: set cluster.num_clusters >= 1")
    if cfg.cluster.levels > 1 and cfg.cluster.branching <= 1:
        raise CurationError("cluster.branching must be > 1 for hierarchical k-means (cluster.levels > 1)")
    if cfg.dedup.phash_max_distance is not None and not 0 <= cfg.dedup.phash_max_distance < 32:
        raise CurationError("dedup.phash_max_distance must be in [0, 31] (or null to turn it off)")
    for key, section in (("dedup.copy_detection", cfg.dedup.copy_detection), ("decontaminate", cfg.decontaminate)):
        if section.verify_min_inliers is not None and section.verify_min_inliers < 4:
            raise CurationError(f"{key}.verify_min_inliers must be >= 4 (a similarity transform fits any 3 "
                                f"matches; 12 is the measured setting, docs/copy_detection.md) or null to turn it off")
        if section.verify_dense_min_inliers is not None and section.verify_dense_min_inliers < 4:
            raise CurationError(f"{key}.verify_dense_min_inliers must be >= 4 (20 is the measured setting, "
                                f"docs/copy_detection.md) or null to turn the dense check off")
        if not 1 <= section.verify_top <= section.k:
            raise CurationError(f"{key}.verify_top must be in [1, {key}.k = {section.k}], got {section.verify_top}")


def _spec(model: ModelRef | None, column: str | None, pooling: str, batch_size: int,
          cfg: CurateConfig) -> EmbedSpec | None:
    if column is None and model is None:
        return None
    e = cfg.embed
    return EmbedSpec(model=None if column else model, column=column, pooling=pooling, batch_size=batch_size,
                     dtype=e.dtype, compute_dtype=e.compute_dtype, chunk_rows=e.chunk_rows, device=e.device)


def resolve_specs(cfg: CurateConfig) -> dict[str, EmbedSpec | None]:
    """Resolve every configured embedder up front, so an offline Hub id fails before any work is done."""
    cache: dict[str, ModelRef] = {}

    def ref(name: str | None, key: str, column: str | None) -> ModelRef | None:
        if name is None or column is not None:
            return None
        if name not in cache:
            cache[name] = resolve_model(name, key)
        return cache[name]

    cd, dc, em = cfg.dedup.copy_detection, cfg.decontaminate, cfg.embed
    specs = {
        "copy_detection": _spec(ref(cd.model, "dedup.copy_detection.model", cd.embedding_column),
                                cd.embedding_column, cd.pooling, cd.batch_size, cfg),
        "decontaminate": _spec(ref(dc.model, "decontaminate.model", dc.embedding_column), dc.embedding_column,
                               dc.pooling, dc.batch_size, cfg) if cfg.eval_sets else None,
        "embed": _spec(ref(em.model, "embed.model", em.embedding_column), em.embedding_column, em.pooling,
                       em.batch_size, cfg) if cfg.select.mode != "none" or cfg.cluster.num_clusters > 0 else None,
    }
    return specs


def _index_key(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


class Pipeline:
    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.dist = DistState()
        # accelerate has initialised torch.distributed when launched with N > 1 processes: the kNN and k-means
        # steps then run on every rank (curation.distributed), the rest on the main process.
        self.comm = Comm.current() if self.dist.world_size > 1 else None
        self.out = Path(cfg.output.dir)
        self.outdir = OutputDir(self.out)
        self.cache = self.out / "cache"
        self.steps = StepCache(self.cache / "steps", self.dist)
        self.records: list[dict[str, Any]] = []
        self.manifest: list[Any] = []
        self.extra: dict[str, Any] = {}
        self.cluster_key: str | None = None

    # ---------- bookkeeping ----------

    def embedding_columns(self, roles: list[str]) -> list[str]:
        """Precomputed embedding columns that ingest must carry for these steps."""
        cfg = self.cfg
        cols = {"copy_detection": cfg.dedup.copy_detection.embedding_column,
                "decontaminate": cfg.decontaminate.embedding_column if cfg.eval_sets else None,
                "embed": cfg.embed.embedding_column if cfg.select.mode != "none" or cfg.cluster.num_clusters > 0
                else None}
        return sorted({cols[r] for r in roles if cols[r]})

    def record(self, step: str, rows_in: int, rows_kept: int, seconds: float, **info: Any) -> None:
        removed = rows_in - rows_kept
        cached = any(e["step"] == step and e["cached"] for e in self.steps.log)
        self.records.append({"step": step, "rows_in": rows_in, "rows_kept": rows_kept, "rows_removed": removed,
                             "seconds": round(seconds, 3), "images_per_s": round(rows_in / seconds, 1)
                             if seconds > 0 else None, "cached": cached, **info})

    def validate_source(self, ds: datasets.Dataset, role: str) -> tuple[datasets.Dataset, datasets.Dataset]:
        """The validate map (decode, normalise, hash) and the valid/invalid split, both cached."""
        v = self.cfg.validate
        key = fingerprint("validate", ds._fingerprint, dataclasses.asdict(v))
        with main_first(self.dist):
            checked = ds.map(validate_batch, fn_kwargs={"cfg": v}, batched=True, batch_size=v.batch_size,
                             num_proc=v.num_proc if v.num_proc > 1 else None, new_fingerprint=key,
                             writer_batch_size=v.batch_size, desc=f"validate {role}")
            valid = checked.filter(lambda r: [x == "" for x in r], input_columns="_reason", batched=True,
                                   batch_size=1000, new_fingerprint=fingerprint(key, "valid"))
            invalid = checked.filter(lambda r: [x != "" for x in r], input_columns="_reason", batched=True,
                                     batch_size=1000, new_fingerprint=fingerprint(key, "invalid"))
        valid._fingerprint = fingerprint(key, "valid")
        return valid, invalid

    def collective(self, name: str, key: str, job: Callable[[], Any]) -> Any:
        """`job()` on every rank unless step (name, key) is finished (the main process decides, so all ranks run
        the same collectives); its result on the main process, which then computes the step."""
        done = self.steps.done(name, key)
        if self.comm is not None:
            done = self.comm.broadcast_object(done)
        return None if done else job()

    def embed(self, ds: datasets.Dataset, key: str, spec: EmbedSpec, name: str) -> EmbeddingStore:
        store, cached = embed_dataset(ds, key, spec, self.cache, self.dist, name)
        self.steps.log.append({"step": f"{name}_embed", "key": key, "cached": cached})
        return store

    # ---------- dedup stages ----------

    def dedup_stage(self, name: str, key: str, alive: np.ndarray,
                    edges: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                    reason: Callable[[float], str], collective: bool = False) -> np.ndarray:
        """Run one graph dedup over the alive rows; update the global representatives; return new alive.

        `collective`: `edges` is a collective (distributed kNN) run by every rank before the step; the components
        are computed from the merged graph on the main process."""
        t0 = time.time()
        graph = self.collective(name, key, lambda: edges(alive)) if collective else None

        def compute(folder: Path) -> None:
            a, b, w = graph if collective else edges(alive)
            res = dedup_from_edges(len(alive), a, b, self.area[alive], self.rank[alive], w)
            removed = res.removed
            np.save(folder / "rep.npy", alive[res.rep])
            table = manifest_table([self.ids[alive[i]] for i in removed], name,
                                   [reason(res.score[i]) for i in removed],
                                   [self.ids[alive[res.rep[i]]] for i in removed])
            pq.write_table(table, folder / "removed.parquet")
            kill_point(f"step:{name}")

        folder = self.steps.run(name, key, compute)
        stage_rep = np.load(folder / "rep.npy")
        composed = np.arange(len(self.ids))
        composed[alive] = stage_rep
        self.rep = composed[self.rep]
        self.manifest.append(pq.read_table(folder / "removed.parquet"))
        kept = alive[stage_rep == alive]
        self.record(name, len(alive), len(kept), time.time() - t0)
        return kept

    # ---------- main ----------

    def run(self) -> dict[str, Any]:
        cfg, dist = self.cfg, self.dist
        check_config(cfg)
        specs = resolve_specs(cfg)  # an offline Hub id fails here, before any work
        self.outdir.check()  # every process: a folder that is not ours is refused before anything is written
        if dist.is_main:
            self.outdir.claim()
        V = self.ingest_and_validate()  # 1-2
        alive = self.hash_dedup(np.arange(len(V)))  # 3
        alive, cd_rows, cd_store = self.copy_dedup(V, alive, specs["copy_detection"])  # 4
        if cfg.eval_sets:  # 5
            alive = self.decontaminate(V, self.vkey, alive, cd_rows, cd_store, specs, self.sha, self.phash,
                                       self.phash_flip)
        store = self.retrieval_embeddings(V, alive, cd_rows, cd_store, specs)  # 6
        km = None
        if store is not None and cfg.cluster.num_clusters > 0:  # 7
            t0 = time.time()
            km = self.kmeans(store, fingerprint(self.vkey, _index_key(alive), specs["embed"].identity()))
            self.record("cluster", len(alive), len(alive), time.time() - t0,
                        num_clusters=int(len(km.centroids)), train_rows=km.info["train_rows"],
                        subsampled=km.info["subsampled"])
        alive_final, selection = self.select(alive, store, km, specs)  # 8
        return self.write_outputs(V, alive, alive_final, selection, km, specs)  # 9

    def ingest_and_validate(self) -> datasets.Dataset:
        """Ingest every source, validate, record rejects; load the per-row arrays the graph steps need."""
        cfg = self.cfg
        t0 = time.time()
        infos: dict[str, dict[str, Any]] = {}
        with main_first(self.dist):
            raw = ingest_all(cfg.sources, self.cache, "sources",
                             self.embedding_columns(["copy_detection", "decontaminate", "embed"]), infos)
        assert raw is not None
        self.extra["entries_listed"] = sum(i["entries_listed"] for i in infos.values())
        self.extra["sources"] = infos
        self.record("ingest", len(raw), len(raw), time.time() - t0)
        t0 = time.time()
        V, invalid = self.validate_source(raw, "sources")
        bad = invalid.select_columns(["id", "_reason"]).to_dict()
        self.manifest.append(manifest_table(bad["id"], "validate", bad["_reason"], [None] * len(bad["id"])))
        self.record("validate", len(raw), len(V), time.time() - t0, reasons=_reason_counts(bad["_reason"]))
        meta = V.select_columns(META_COLUMNS).to_dict()
        self.ids = meta["id"]
        self.area = np.asarray(meta["width"], dtype=np.int64) * np.asarray(meta["height"], dtype=np.int64)
        self.rank = id_ranks(self.ids)
        self.rep = np.arange(len(V))
        self.sha = np.asarray(meta["sha256"])
        self.phash = hex_to_uint64(meta["phash"])
        self.phash_flip = hex_to_uint64(meta["phash_flip"])
        self.vkey = V._fingerprint
        return V

    def hash_dedup(self, alive: np.ndarray) -> np.ndarray:
        d = self.cfg.dedup
        sha, phash, phash_flip = self.sha, self.phash, self.phash_flip
        if d.exact:
            alive = self.dedup_stage(
                "exact_dedup", fingerprint("exact", self.vkey), alive,
                lambda rows: (*exact_edges(sha[rows]), None), lambda s: "exact_duplicate: same sha256")
        if d.phash_max_distance is not None:
            dist_max = d.phash_max_distance

            def ph_edges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                a, b, dd = phash_edges(phash[rows], phash_flip[rows], dist_max)
                return a, b, -dd.astype(np.float64)  # score = -distance: the closest match is reported

            alive = self.dedup_stage(
                "phash_dedup", fingerprint("phash", self.vkey, _index_key(alive), dist_max), alive, ph_edges,
                lambda s: f"perceptual_duplicate: pHash Hamming distance {int(-s)} <= {dist_max}")
        return alive

    def copy_dedup(self, V: datasets.Dataset, alive: np.ndarray, spec: EmbedSpec | None,
                   ) -> tuple[np.ndarray, np.ndarray, EmbeddingStore | None]:
        """Embed the rows still alive, kNN + threshold + components; returns (alive, embedded rows, store)."""
        cfg, cd_rows = self.cfg, alive
        if spec is None or not len(alive):
            return alive, cd_rows, None
        t0 = time.time()
        cd_key = fingerprint(self.vkey, _index_key(cd_rows))
        store = self.embed(V.select(cd_rows), cd_key, spec, "copy_detection")
        self.record("copy_detection_embed", len(alive), len(alive), time.time() - t0)
        c = cfg.dedup.copy_detection

        def cd_edges(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
            info, blocks = knn_search(store, store, c.k, cfg.index, cfg.seed, self.comm)
            self.extra["copy_detection_index"] = info.as_dict()
            parts, near_misses = [], []
            for start, sims, ids in blocks:  # blocks stream: one pass
                parts.append(knn_edges(ids, sims, c.threshold, start))
                if c.verify_min_inliers is not None:
                    near_misses.append(candidate_pairs(ids, sims, start, c.verify_top, c.threshold))
            if self.comm is not None and not self.comm.is_main:
                return None  # the merged blocks went to the main process
            if near_misses:  # keypoint check of the near misses (main process only)
                cosine = tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
                parts = [self.verified_edges(V, cd_rows, near_misses, c.verify_min_inliers, cosine,
                                             c.verify_dense_min_inliers)]
            return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

        def reason(s: float) -> str:
            if s > c.threshold:
                return f"near_duplicate: cosine {s:.4f} > {c.threshold}"
            return f"near_duplicate: cosine {s:.4f}, >= {c.verify_min_inliers} ORB keypoint matches fit one transform"

        key = fingerprint("copy", cd_key, spec.identity(), c.k, c.threshold, dataclasses.asdict(cfg.index),
                          c.verify_min_inliers, c.verify_top, c.verify_dense_min_inliers)
        alive = self.dedup_stage("copy_dedup", key, alive, cd_edges, reason, collective=True)
        return alive, cd_rows, store

    def verified_edges(self, V: datasets.Dataset, rows: np.ndarray,
                       near_misses: list[tuple[np.ndarray, np.ndarray, np.ndarray]], min_inliers: int,
                       cosine: tuple[np.ndarray, np.ndarray, np.ndarray], dense_min_inliers: int | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All copy-detection edges (a, b, cosine) once keypoints are checked: the `cosine` edges less those
        geometry contradicts (`geometric_veto`), plus the near misses (per-block `candidate_pairs`) that pass the
        keypoint check and join a group to its best partner (`collage_safe_joins`: a collage does not merge its two
        sources); groups are the components of the kept cosine edges, their sizes count the rows earlier stages
        folded in."""
        t0 = time.time()
        ca, cb, cw = unique_pairs(np.minimum(cosine[0], cosine[1]), np.maximum(cosine[0], cosine[1]), cosine[2])
        a, b, w = unique_pairs(*(np.concatenate([m[i] for m in near_misses]) for i in range(3)))
        inliers, fewest = verify_pairs(lambda i: decode_image(V[int(rows[i])]["image"], max_pixels=None),
                                       np.concatenate([ca, a]), np.concatenate([cb, b]), return_keypoints=True,
                                       dense_min_inliers=dense_min_inliers)
        vetoed = geometric_veto(inliers[: len(ca)], fewest[: len(ca)])
        ca, cb, cw, inliers = ca[~vetoed], cb[~vetoed], cw[~vetoed], inliers[len(vetoed):]
        keep = inliers >= min_inliers
        labels = connected_components(len(rows), ca, cb)
        folded = np.bincount(self.rep, minlength=len(self.rep))[rows]
        sizes = np.bincount(labels, weights=folded, minlength=len(rows))
        verified = int(keep.sum())
        keep[keep] = collage_safe_joins(labels, sizes, a[keep], b[keep], w[keep])
        self.extra["copy_detection_verify"] = {"pairs_checked": int(len(a)), "pairs_verified": verified,
                                               "pairs_joined": int(keep.sum()), "cosine_edges_checked": len(vetoed),
                                               "cosine_edges_vetoed": int(vetoed.sum()), "min_inliers": min_inliers,
                                               "dense_min_inliers": dense_min_inliers,
                                               "seconds": round(time.time() - t0, 2)}
        return np.concatenate([ca, a[keep]]), np.concatenate([cb, b[keep]]), np.concatenate([cw, w[keep]])

    def retrieval_embeddings(self, V: datasets.Dataset, alive: np.ndarray, cd_rows: np.ndarray,
                             cd_store: EmbeddingStore | None, specs: dict[str, EmbedSpec | None],
                             ) -> EmbeddingStore | None:
        em_spec, cd_spec = specs["embed"], specs["copy_detection"]
        if em_spec is None or not len(alive):
            return None
        t0 = time.time()
        reused = cd_store is not None and cd_spec is not None and em_spec.identity() == cd_spec.identity()
        if reused:
            store = cd_store.subset(np.searchsorted(cd_rows, alive))  # same model: no second pass
        else:
            store = self.embed(V.select(alive), fingerprint(self.vkey, _index_key(alive)), em_spec, "retrieval")
        self.record("retrieval_embed", len(alive), len(alive), 0.0 if reused else time.time() - t0,
                    reused_copy_detection=reused)
        return store

    def decontaminate(self, V: datasets.Dataset, vkey: str, alive: np.ndarray, cd_rows: np.ndarray,
                      cd_store: EmbeddingStore | None, specs: dict[str, EmbedSpec | None], sha: np.ndarray,
                      phash: np.ndarray, phash_flip: np.ndarray) -> np.ndarray:
        """Drop the representative of every duplicate component that touches an eval image (exact bytes,
        pHash, or embedding cosine > decontaminate.threshold)."""
        cfg = self.cfg
        t0 = time.time()
        with main_first(self.dist):
            ev_raw = ingest_all(cfg.eval_sets, self.cache, "eval_sets", self.embedding_columns(["decontaminate"]))
        ev, ev_bad = self.validate_source(ev_raw, "eval_sets")
        self.extra["eval_sets"] = _side_info(ev_raw, ev, ev_bad)
        ev_meta = ev.select_columns(META_COLUMNS).to_dict()
        dc_spec, cd_spec = specs["decontaminate"], specs["copy_detection"]
        dc_store = ev_store = None
        if dc_spec is not None and len(ev) and len(cd_rows):
            if cd_store is not None and cd_spec is not None and dc_spec.identity() == cd_spec.identity():
                dc_store = cd_store
            else:
                dc_store = self.embed(V.select(cd_rows), fingerprint(vkey, _index_key(cd_rows)), dc_spec,
                                      "decontaminate")
            ev_store = self.embed(ev, ev._fingerprint, dc_spec, "eval")
        key = fingerprint("decontaminate", vkey, _index_key(alive), _index_key(cd_rows), ev._fingerprint,
                          dc_spec.identity() if dc_spec else None, cfg.decontaminate.threshold,
                          cfg.decontaminate.k, cfg.dedup.exact, cfg.dedup.phash_max_distance,
                          cfg.decontaminate.verify_min_inliers, cfg.decontaminate.verify_top,
                          cfg.decontaminate.verify_dense_min_inliers)

        ev_ids = ev_meta["id"]

        def embedding_hits() -> list[tuple[int, str, str]]:
            """Eval images searched in the index of the embedded rows (collective: every rank runs it)."""
            hits: list[tuple[int, str, str]] = []
            if dc_store is None or ev_store is None:
                return hits
            d = cfg.decontaminate
            _, blocks = knn_search(dc_store, ev_store, d.k, cfg.index, cfg.seed, self.comm)
            near_misses: list[tuple[int, int, float]] = []  # (eval row, embedded row, cosine)
            for start, sims, ids in blocks:
                q, j = np.nonzero((sims > d.threshold) & (ids >= 0))
                hits += [(int(cd_rows[ids[a, b]]), ev_ids[start + a], f"cosine {sims[a, b]:.4f} > {d.threshold}")
                         for a, b in zip(q, j)]
                if d.verify_min_inliers is not None:
                    q, j = np.nonzero(~(sims[:, :d.verify_top] > d.threshold) & (ids[:, :d.verify_top] >= 0))
                    near_misses += [(start + int(a), int(ids[a, b]), float(sims[a, b])) for a, b in zip(q, j)]
            if near_misses and (self.comm is None or self.comm.is_main):
                e, r, cos = (np.array(x) for x in zip(*near_misses))
                inliers = verify_pairs(lambda i: decode_image(ev[int(i)]["image"], max_pixels=None), e, r,
                                       lambda i: decode_image(V[int(cd_rows[i])]["image"], max_pixels=None),
                                       dense_min_inliers=d.verify_dense_min_inliers)
                hits += [(int(cd_rows[r[i]]), ev_ids[e[i]], f"cosine {cos[i]:.4f}, {inliers[i]} ORB keypoint "
                          f"matches fit one transform (>= {d.verify_min_inliers})")
                         for i in np.nonzero(inliers >= d.verify_min_inliers)[0]]
            return hits

        emb_hits = self.collective("decontaminate", key, embedding_hits)

        def compute(folder: Path) -> None:
            hits: list[tuple[int, str, str]] = []  # (V row, eval id, how)
            if cfg.dedup.exact and len(ev_ids):
                where = {h: i for i, h in enumerate(ev_meta["sha256"])}
                for row in np.nonzero(np.isin(sha, list(where)))[0]:
                    hits.append((int(row), ev_ids[where[sha[row]]], "identical file bytes (sha256)"))
            dmax = cfg.dedup.phash_max_distance
            if dmax is not None and len(ev_ids):
                for queries in (hex_to_uint64(ev_meta["phash"]), hex_to_uint64(ev_meta["phash_flip"])):
                    qi, rows, dist = hamming_pairs(phash, dmax, queries=queries)
                    hits += [(int(r), ev_ids[q], f"pHash distance {int(dd)} <= {dmax}")
                             for q, r, dd in zip(qi, rows, dist)]
            hits += emb_hits
            hit_rows = np.array([h[0] for h in hits], dtype=np.int64)
            reps = contaminated_components(self.rep, hit_rows)
            reps = reps[np.isin(reps, alive)]
            first: dict[int, tuple[int, str, str]] = {}
            for h in hits:
                first.setdefault(int(self.rep[h[0]]), h)
            ids = [self.ids[r] for r in reps]
            reasons = [f"eval_overlap: {self.ids[first[r][0]]} matches eval image {first[r][1]} "
                       f"({first[r][2]}); whole duplicate component dropped" for r in reps]
            pq.write_table(manifest_table(ids, "decontaminate", reasons, [first[r][1] for r in reps]),
                           folder / "removed.parquet")
            np.save(folder / "removed_rows.npy", reps)
            kill_point("step:decontaminate")

        folder = self.steps.run("decontaminate", key, compute)
        removed = np.load(folder / "removed_rows.npy")
        self.manifest.append(pq.read_table(folder / "removed.parquet"))
        kept = alive[~np.isin(alive, removed)]
        self.record("decontaminate", len(alive), len(kept), time.time() - t0)
        return kept

    def kmeans(self, store: EmbeddingStore, key: str) -> KMeansResult:
        cfg = self.cfg
        t0 = time.time()

        self.cluster_key = fingerprint("cluster", key, dataclasses.asdict(cfg.cluster), KMEANS_ALGORITHM)
        result = self.collective("cluster", self.cluster_key, lambda: cluster_store(store, cfg.cluster, self.comm))

        def compute(folder: Path) -> None:
            km = result
            assert km is not None  # computed by the collective job (on this, the main process)
            np.savez(folder / "kmeans.npz", centroids=km.centroids, labels=km.labels,
                     **{f"parent{i}": p for i, p in enumerate(km.parents)})
            write_json(folder / "info.json", km.info)

        folder = self.steps.run("cluster", self.cluster_key, compute)
        data = np.load(folder / "kmeans.npz")
        parents = [data[f"parent{i}"] for i in range(len(data.files) - 2)]
        km = KMeansResult(data["centroids"], data["labels"], parents, read_json(folder / "info.json"))
        self.extra["cluster"] = {**km.info, "seconds": round(time.time() - t0, 3)}
        return km

    def select(self, alive: np.ndarray, store: EmbeddingStore | None, km: KMeansResult | None,
               specs: dict[str, EmbedSpec | None]) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = self.cfg
        t0 = time.time()
        mode = cfg.select.mode
        seeds_store, seed_ids, seed_sources, skey = None, [], np.zeros(0, dtype=object), None
        if mode in ("sample", "cluster"):
            with main_first(self.dist):
                s_raw = ingest_all(cfg.seeds, self.cache, "seeds", self.embedding_columns(["embed"]))
            s_ds, s_bad = self.validate_source(s_raw, "seeds")
            self.extra["seeds"] = _side_info(s_raw, s_ds, s_bad)
            if len(s_ds) == 0:
                raise CurationError("no seed image survived validation; check the `seeds` sources")
            seed_meta = s_ds.select_columns(["id", "source"]).to_dict()
            seed_ids, seed_sources = seed_meta["id"], np.asarray(seed_meta["source"], dtype=object)
            seeds_store = self.embed(s_ds, s_ds._fingerprint, specs["embed"], "seeds")
            skey = s_ds._fingerprint
        key = fingerprint("select", dataclasses.asdict(cfg.select), _index_key(alive), skey,
                          specs["embed"].identity() if specs["embed"] else None,
                          self.cluster_key if km is not None else None, dataclasses.asdict(cfg.index))

        def compute(folder: Path) -> None:
            sel = select_rows(mode, store, seeds_store, seed_ids, seed_sources, km, cfg.select, cfg.index,
                              len(alive))
            np.savez(folder / "selection.npz", rows=sel.rows, similarity=sel.similarity,
                     retrieved_by=np.asarray([s or "" for s in sel.retrieved_by], dtype=np.str_))
            write_json(folder / "info.json", sel.info)

        folder = self.steps.run("select", key, compute)
        data = np.load(folder / "selection.npz")
        rows = data["rows"]
        selection = {"rows": rows, "similarity": data["similarity"],
                     "retrieved_by": [s or None for s in data["retrieved_by"].tolist()],
                     "info": read_json(folder / "info.json")}
        dropped = np.setdiff1d(np.arange(len(alive)), rows)
        self.manifest.append(manifest_table([self.ids[alive[i]] for i in dropped], "select",
                                            [f"not_selected: select.mode={mode}"] * len(dropped),
                                            [None] * len(dropped)))
        self.record("select", len(alive), len(rows), time.time() - t0, **selection["info"])
        return alive[rows], selection

    def write_outputs(self, V: datasets.Dataset, alive: np.ndarray, final_rows: np.ndarray,
                      selection: dict[str, Any], km: KMeansResult | None,
                      specs: dict[str, EmbedSpec | None]) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.dist.is_main:  # one writer; the other processes only wait
            stats = self._write_outputs(V, final_rows, selection, km, specs)
        self.dist.barrier()
        return stats

    def _write_outputs(self, V: datasets.Dataset, final_rows: np.ndarray, selection: dict[str, Any],
                       km: KMeansResult | None, specs: dict[str, EmbedSpec | None]) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        n = len(final_rows)
        cluster = (km.labels[selection["rows"]].tolist() if km is not None else [None] * n)
        out_ds = V.select(final_rows).flatten_indices()
        out_ds = out_ds.add_column("cluster", cluster, feature=datasets.Value("int64"))
        out_ds = out_ds.add_column("retrieved_by", selection["retrieved_by"], feature=datasets.Value("string"))
        sims = [None if np.isnan(s) else float(s) for s in selection["similarity"]]
        out_ds = out_ds.add_column("similarity", sims, feature=datasets.Value("float32"))
        columns = [c for c in OUTPUT_COLUMNS if cfg.output.keep_images or c != "image"]
        out_ds = out_ds.select_columns(columns)
        if "image" in columns and n:
            out_ds = out_ds.cast_column("image", datasets.Image())
        elif "image" in columns:  # datasets cannot cast a table without chunks: build the empty one typed
            features = out_ds.features.copy()
            features["image"] = datasets.Image()
            out_ds = datasets.Dataset.from_dict({c: [] for c in columns}, features=features)
        models = {k: (s.model.name if s.model else f"column:{s.column}") for k, s in specs.items() if s}
        # Every piece goes to a staging folder first; one rename publishes them together (curation.outdir).
        stage = self.outdir.staging()
        save_dataset(out_ds, stage / "dataset")
        kill_point("commit:dataset")
        manifest = write_manifest(self.manifest, stage)
        kill_point("commit:manifest")
        self.record("output", n, n, time.time() - t0)
        stats = {"num_rows": n, "num_removed": manifest.num_rows,
                 "removed_reasons": _reason_counts(manifest.column("reason").to_pylist()), "steps": self.records,
                 "models": models, "step_cache": self.steps.log, "world_size": self.dist.world_size, **self.extra}
        check_invariants(stats)
        write_json(stage / "stats.json", stats)
        kill_point("commit:stats")
        card = render_card(cfg, stats, models)
        (stage / "README.md").write_text(card)
        kill_point("commit:card")
        save_config(cfg, stage / "config.yaml")
        kill_point("commit:config")
        build_hub_folder(load_saved(stage / "dataset"), card, stage / "hub", cfg.output.max_shard_size,
                         [stage / "removed.parquet", stage / "stats.json"])
        kill_point("commit:hub")
        published = self.outdir.publish(stage)
        kill_point("commit:done")
        if cfg.output.push:
            if not cfg.output.repo_id:
                raise CurationError("output.push=true needs output.repo_id (e.g. my-org/my-curated-images)")
            stats["pushed"] = push_folder(published / "hub", cfg.output.repo_id, cfg.output.private)
            write_json(published / "stats.json", stats)  # one atomic file replace inside the published output
        return stats


def load_saved(path: Path) -> datasets.Dataset:
    return datasets.load_from_disk(str(path))


def _reason_counts(reasons: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        kind = r.split(":", 1)[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def _side_info(raw: datasets.Dataset, valid: datasets.Dataset, invalid: datasets.Dataset) -> dict[str, Any]:
    bad = invalid.select_columns(["id", "_reason"]).to_dict()
    return {"rows": len(raw), "valid": len(valid),
            "invalid": [{"id": i, "reason": r} for i, r in zip(bad["id"], bad["_reason"])]}


def check_invariants(stats: dict[str, Any]) -> None:
    """rows_in = rows_kept + rows_removed for every step, each step starts where the previous ended, every input
    row is either in the output or in the manifest, and every listed entry of every source is one of those rows:
    `entries_listed` = `num_rows` + `num_removed` (= the sum over `sources`; `removed_reasons` add up too)."""
    steps = stats["steps"]
    for s in steps:
        if s["rows_in"] != s["rows_kept"] + s["rows_removed"]:
            raise RuntimeError(f"step {s['step']}: counts do not add up: {s}")
    for prev, cur in zip(steps, steps[1:]):
        if cur["rows_in"] != prev["rows_kept"]:
            raise RuntimeError(f"step {cur['step']} starts with {cur['rows_in']} rows, previous kept "
                               f"{prev['rows_kept']}")
    if steps and steps[0]["rows_in"] != stats["num_rows"] + stats["num_removed"]:
        raise RuntimeError("input rows != output rows + removed rows")
    if stats["entries_listed"] != stats["num_rows"] + stats["num_removed"]:
        raise RuntimeError(f"entries listed ({stats['entries_listed']}) != kept ({stats['num_rows']}) + removed "
                           f"({stats['num_removed']})")
    if sum(s["entries_listed"] for s in stats["sources"].values()) != stats["entries_listed"]:
        raise RuntimeError("entries listed per source do not add up to entries_listed")
    if sum(stats["removed_reasons"].values()) != stats["num_removed"]:
        raise RuntimeError("removal reasons do not add up to num_removed")


def run_pipeline(cfg: CurateConfig) -> dict[str, Any]:
    """Run the whole pipeline for a resolved config; returns the stats written to `output.dir/stats.json`."""
    return Pipeline(cfg).run()


__all__ = ["run_pipeline", "Pipeline", "check_config", "resolve_specs", "SourceConfig"]
