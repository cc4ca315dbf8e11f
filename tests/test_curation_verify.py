"""Keypoint verification of copy candidates (curation/verify.py) and its use in curate.py."""

import datasets
import numpy as np
from curation_fixtures import distinct_images, encode
from PIL import Image

from curation import CurateConfig, run_pipeline
from curation.graph import connected_components
from curation.verify import (
    candidate_pairs,
    collage_safe_joins,
    count_inliers,
    geometric_veto,
    orb_keypoints,
    verify_pairs,
)
from training.config import load_config


def _rotated_crop(image: Image.Image) -> Image.Image:
    """A corner crop (60 % of the side), rotated 25 degrees, rescaled: a copy no hash and no threshold finds."""
    w, h = image.size
    crop = image.crop((0, 0, int(0.6 * w), int(0.6 * h)))
    return crop.rotate(25, resample=Image.BICUBIC, expand=True).resize((w, h), Image.BICUBIC)


def test_copy_has_many_inliers_and_unrelated_photos_few():
    tiles = [t[1] for t in distinct_images(8, size=128)]
    original, copy = tiles[0], _rotated_crop(tiles[0])
    same = count_inliers(orb_keypoints(copy), orb_keypoints(original))
    others = [count_inliers(orb_keypoints(copy), orb_keypoints(t)) for t in tiles[1:]]
    assert same >= 12, same
    assert max(others) < 12, others
    # the mirrored image is tried too: a flipped copy is found through it
    flipped = verify_pairs(lambda i: [original.transpose(Image.FLIP_LEFT_RIGHT), original][i],
                           np.array([0]), np.array([1]))
    assert flipped[0] >= 12


def test_dim_low_contrast_copy_is_matched():
    """FAST's corner threshold is absolute: a dim, low-contrast image (grey levels squeezed into 10 % of the range,
    then blurred) had no keypoints at all before the contrast stretch, so it could never be verified."""
    from PIL import ImageFilter

    tiles = [t[1] for t in distinct_images(8, size=128)]
    original = tiles[0]
    dim = Image.eval(original, lambda v: 100 + v // 10).filter(ImageFilter.GaussianBlur(1.5))
    dim = dim.rotate(90, expand=True)
    assert len(orb_keypoints(dim).points) >= 50
    same = count_inliers(orb_keypoints(dim), orb_keypoints(original))
    others = [count_inliers(orb_keypoints(dim), orb_keypoints(t)) for t in tiles[1:]]
    assert same >= 12, same
    assert max(others) < 12, others
    # seeded RANSAC: the same count every time
    assert count_inliers(orb_keypoints(dim), orb_keypoints(original)) == same


def test_dense_check_finds_a_small_crop_the_first_check_misses():
    """A 35 % crop of a tile, upscaled: few of the tile's 400 keypoints lie inside it, so the first check finds too
    few inliers; with 800 per image it passes the stricter count, and unrelated tiles stay far below it."""
    tiles = [t[1] for t in distinct_images(8, size=128)]
    w = tiles[1].width
    crop = tiles[1].crop((int(0.4 * w), int(0.4 * w), int(0.75 * w), int(0.75 * w))).resize((128, 128), Image.BICUBIC)
    images = [crop, *tiles]
    others = np.array([i for i in range(1, 9) if i != 2])
    first = verify_pairs(lambda i: images[i], np.array([0]), np.array([2]))
    dense = verify_pairs(lambda i: images[i], np.zeros(8, dtype=np.int64), np.array([2, *others]), dense_min_inliers=20)
    assert first[0] < 12 <= 20 <= dense[0], (first, dense)
    assert dense[1:].max() < 12, dense  # unrelated tiles keep their (low) first count


def test_candidate_pairs_are_the_near_misses_among_the_top_neighbours():
    indices = np.array([[0, 1, 2, 3], [1, 0, 3, -1], [2, 3, 0, 1]])
    sims = np.array([[1.0, 0.97, 0.5, 0.4], [1.0, 0.97, 0.6, 0.0], [1.0, 0.7, 0.5, 0.3]])
    a, b, w = candidate_pairs(indices, sims, 0, top=3, threshold=0.95)
    # (0, 1) is already an edge (0.97 > 0.95), self matches and padding are dropped, (0, 3) is outside 0's top 3;
    # (2, 3) is found from row 2 (0.7); (0, 2) from row 0 first (0.5)
    assert list(zip(a.tolist(), b.tolist(), w.tolist())) == [(0, 2, 0.5), (1, 3, 0.6), (2, 3, 0.7)]


def test_a_collage_does_not_merge_its_two_sources():
    """Groups: {0, 1, 2} (image A and two copies), {3, 4} (image B and a copy), {5} (a collage: B pasted into a
    copy of A), {6} (a crop of A), {7} (a crop of the crop 6). The collage matches A's group strongly and B's
    weakly: it joins A's group only, so A and B stay apart; the crops join A's group through their best partners."""
    labels = np.array([0, 0, 0, 3, 3, 5, 6, 7])
    sizes = np.bincount(labels, minlength=8)
    a = np.array([0, 3, 4, 0, 1, 6])
    b = np.array([5, 5, 5, 6, 6, 7])
    similarity = np.array([0.9, 0.6, 0.5, 0.8, 0.7, 0.4])
    keep = collage_safe_joins(labels, sizes, a, b, similarity)
    assert keep.tolist() == [True, False, False, True, True, True]
    # two groups of several images join when the matches involve two images of each, not through one image
    labels = np.array([0, 0, 2, 2, 4, 4])
    sizes = np.bincount(labels, minlength=6)
    a, b = np.array([0, 1, 0, 1]), np.array([2, 3, 4, 4])
    assert collage_safe_joins(labels, sizes, a, b, np.array([0.2, 0.2, 0.9, 0.9])).tolist() == [True, True, False, False]
    # a pair inside one group is never selected
    assert collage_safe_joins(labels, sizes, np.array([0]), np.array([1]), np.array([0.99])).tolist() == [False]


def _final_groups(labels: np.ndarray, a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> list[set[int]]:
    joined = connected_components(len(labels), np.concatenate([a[keep], np.arange(len(labels))]),
                                  np.concatenate([b[keep], labels]))
    return sorted(({i for i in range(len(labels)) if joined[i] == r} for r in set(joined.tolist())), key=min)


def test_a_single_image_prefers_an_established_group_to_a_lone_partner():
    """Seen on benchmark seed 6. {0, 1}: photo A and a copy; {2, 3}: photo B and a copy; 4: a collage (B pasted
    into A); 5: a rotated copy of B, more similar to the collage (0.76) than to B (0.70); 6: a recoloured B.
    Chosen by cosine alone, 5 joined the lone collage while the collage joined A's group, and the two images of
    B's side that then matched A's group (2 and 6) merged A and B. An established group is preferred: 5 joins B."""
    labels = np.array([0, 0, 2, 2, 4, 5, 6])
    sizes = np.bincount(labels, minlength=7)
    a = np.array([0, 1, 2, 2, 4, 2, 6])
    b = np.array([4, 4, 4, 5, 5, 6, 5])
    similarity = np.array([0.87, 0.87, 0.66, 0.70, 0.76, 0.97, 0.65])
    keep = collage_safe_joins(labels, sizes, a, b, similarity)
    assert _final_groups(labels, a, b, keep) == [{0, 1, 4}, {2, 3, 5, 6}]
    # two crops of one photo that match each other and the photo's group join that group, not each other first
    labels = np.array([0, 0, 2, 3])
    a, b = np.array([2, 0, 0]), np.array([3, 2, 3])
    keep = collage_safe_joins(labels, np.bincount(labels, minlength=4), a, b, np.array([0.9, 0.6, 0.6]))
    assert _final_groups(labels, a, b, keep) == [{0, 1, 2, 3}]


def test_pipeline_joins_a_verified_near_miss_and_reports_why(tmp_path):
    """Row 7 is a rotated corner crop of row 0 whose embedding is far (cosine 0.5 < 0.95): only the keypoint
    check finds it; the eval image is a rotated crop of row 3 at cosine 0.3 < 0.45."""
    tiles = [t[1] for t in distinct_images(9, size=128)]
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    images = tiles[:7] + [_rotated_crop(tiles[0])]
    emb = [basis[i] for i in range(7)] + [0.5 * basis[0] + np.sqrt(0.75) * basis[8]]
    feats = datasets.Features({"image": datasets.Image(), "emb": datasets.List(datasets.Value("float32"))})
    datasets.Dataset.from_dict({"image": [{"bytes": encode(t), "path": None} for t in images],
                                "emb": [e.tolist() for e in emb]}, features=feats).save_to_disk(str(tmp_path / "src"))
    ev_emb = (0.3 * basis[3] + np.sqrt(0.91) * basis[9]).tolist()
    datasets.Dataset.from_dict({"image": [{"bytes": encode(_rotated_crop(tiles[3])), "path": None}], "emb": [ev_emb]},
                               features=feats).save_to_disk(str(tmp_path / "ev"))

    def run(out: str, verify: str) -> tuple[dict, dict]:
        cfg = load_config(CurateConfig, [
            f"sources=[{{name: src, path: {tmp_path / 'src'}}}]", f"eval_sets=[{{name: ev, path: {tmp_path / 'ev'}}}]",
            "validate.min_size=32", "dedup.phash_max_distance=4", "dedup.copy_detection.embedding_column=emb",
            "dedup.copy_detection.threshold=0.95", "decontaminate.embedding_column=emb",
            f"dedup.copy_detection.verify_min_inliers={verify}", f"decontaminate.verify_min_inliers={verify}",
            "embed.model=null", "cluster.num_clusters=0", "select.mode=none", f"output.dir={tmp_path / out}"])
        stats = run_pipeline(cfg)
        removed = datasets.load_from_disk(str(tmp_path / out / "removed")).to_list()
        return stats, {r["id"]: r for r in removed}

    stats, manifest = run("off", "null")
    assert manifest == {} and stats["num_rows"] == 8
    stats, manifest = run("on", "12")
    assert set(manifest) == {"src/000000007", "src/000000003"}
    assert manifest["src/000000007"]["step"] == "copy_dedup"
    assert manifest["src/000000007"]["duplicate_of"] == "src/000000000"
    assert "ORB keypoint matches" in manifest["src/000000007"]["reason"]
    assert manifest["src/000000003"]["step"] == "decontaminate"
    assert "ORB keypoint matches" in manifest["src/000000003"]["reason"]
    assert stats["num_rows"] == 6
    card = (tmp_path / "on" / "README.md").read_text()
    assert card.count(">= 12 ORB keypoint matches fit one similarity transform") == 2  # dedup and decontamination
    assert "ORB" not in (tmp_path / "off" / "README.md").read_text()


def test_pipeline_keeps_the_sources_of_a_collage_apart(tmp_path):
    """Rows 0-1: image A and a JPEG copy; rows 2-3: image B and a JPEG copy (each pair at cosine 0.99, one group);
    row 4: a collage, B pasted over half of A (cosine 0.5 to A, 0.4 to B: near misses). The collage matches both
    A and B by keypoints; it joins A's group only, and B's group keeps its own image."""
    tiles = [t[1] for t in distinct_images(6, size=128)]
    a_img, b_img = tiles[0], tiles[1]
    collage = a_img.copy()
    collage.paste(b_img.resize((64, 64), Image.BICUBIC), (64, 64))
    assert count_inliers(orb_keypoints(collage), orb_keypoints(b_img)) >= 12  # the weak match is there
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    near = np.sqrt(1 - 0.99**2)
    emb = [basis[0], 0.99 * basis[0] + near * basis[5], basis[1], 0.99 * basis[1] + near * basis[6],
           0.5 * basis[0] + 0.4 * basis[1] + np.sqrt(1 - 0.41) * basis[7]]
    jpeg = [encode(im.convert("RGB"), "JPEG", quality=90) for im in (a_img, b_img)]
    images = [encode(a_img), jpeg[0], encode(b_img), jpeg[1], encode(collage)]
    feats = datasets.Features({"image": datasets.Image(), "emb": datasets.List(datasets.Value("float32"))})
    datasets.Dataset.from_dict({"image": [{"bytes": x, "path": None} for x in images], "emb": [e.tolist() for e in emb]},
                               features=feats).save_to_disk(str(tmp_path / "src"))
    cfg = load_config(CurateConfig, [
        f"sources=[{{name: src, path: {tmp_path / 'src'}}}]", "validate.min_size=32", "dedup.phash_max_distance=null",
        "dedup.copy_detection.embedding_column=emb", "dedup.copy_detection.threshold=0.95",
        "dedup.copy_detection.verify_min_inliers=12", "dedup.copy_detection.verify_dense_min_inliers=20",
        "embed.model=null", "decontaminate.model=null",
        "cluster.num_clusters=0", "select.mode=none", f"output.dir={tmp_path / 'out'}"])
    stats = run_pipeline(cfg)
    removed = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "out" / "removed")).to_list()}
    assert stats["num_rows"] == 2, removed  # one of A's group, one of B's group
    assert removed["src/000000004"]["duplicate_of"] in {"src/000000000", "src/000000001"}
    assert "ORB keypoint matches" in removed["src/000000004"]["reason"]
    assert removed["src/000000003"]["duplicate_of"] == "src/000000002" or removed["src/000000002"]["duplicate_of"] \
        == "src/000000003"
    verify = stats["copy_detection_verify"]
    assert verify["pairs_verified"] > verify["pairs_joined"] >= 1  # both matches were found, only A's joined
    assert verify["dense_min_inliers"] == 20


def test_cosine_edge_that_geometry_contradicts_is_dropped(tmp_path):
    """Rows 0 and 1 are different textured tiles the embedding calls copies (cosine 0.99): with the keypoint check on,
    the edge is dropped (both images have many keypoints, none agree) and both rows are kept; off, one is removed.
    A near-flat pair keeps its cosine edge: geometry has nothing to say there."""
    tiles = [t[1] for t in distinct_images(4, size=128)]
    inliers, fewest = verify_pairs(lambda i: tiles[i], np.array([0]), np.array([1]), return_keypoints=True)
    assert fewest[0] >= 80 and inliers[0] <= 3  # the precondition of the veto
    assert geometric_veto(inliers, fewest).tolist() == [True]
    assert geometric_veto(np.array([0]), np.array([20])).tolist() == [False]  # keypoint-poor: no veto
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    emb = [basis[0], 0.99 * basis[0] + np.sqrt(1 - 0.99**2) * basis[5], basis[1], basis[2]]
    feats = datasets.Features({"image": datasets.Image(), "emb": datasets.List(datasets.Value("float32"))})
    datasets.Dataset.from_dict({"image": [{"bytes": encode(t), "path": None} for t in tiles],
                                "emb": [e.tolist() for e in emb]}, features=feats).save_to_disk(str(tmp_path / "src"))

    def run(out: str, verify: str) -> dict:
        cfg = load_config(CurateConfig, [
            f"sources=[{{name: src, path: {tmp_path / 'src'}}}]", "validate.min_size=32",
            "dedup.phash_max_distance=null", "dedup.copy_detection.embedding_column=emb",
            "dedup.copy_detection.threshold=0.95", f"dedup.copy_detection.verify_min_inliers={verify}",
            "embed.model=null", "decontaminate.model=null", "cluster.num_clusters=0", "select.mode=none",
            f"output.dir={tmp_path / out}"])
        return run_pipeline(cfg)

    assert run("off", "null")["num_rows"] == 3
    stats = run("on", "12")
    assert stats["num_rows"] == 4
    assert stats["copy_detection_verify"]["cosine_edges_vetoed"] == 1


def test_bad_verify_settings_are_named(tmp_path):
    import pytest

    from curation import CurationError
    from curation.pipeline import check_config

    for override, message in (("dedup.copy_detection.verify_min_inliers=3", "verify_min_inliers must be >= 4"),
                              ("decontaminate.verify_dense_min_inliers=2", "verify_dense_min_inliers must be >= 4"),
                              ("decontaminate.verify_top=100", "decontaminate.verify_top must be in [1,")):
        cfg = load_config(CurateConfig, [f"sources=[{{name: a, path: {tmp_path}}}]", "select.mode=none", override])
        with pytest.raises(CurationError, match=message.replace("[", r"\[")):
            check_config(cfg)
