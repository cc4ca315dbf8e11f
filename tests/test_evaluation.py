"""training.evaluation: k-NN protocol, linear probe, feature extraction + cache, errors; training.classifier export."""

from __future__ import annotations

import math
import os
import socket

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import evaluation as ev
from training.classifier import export_classifier_model
from training.evaluation import (
    EvaluationError,
    FeatureCache,
    FeatureSet,
    LinearHead,
    LinearProbeConfig,
    ProbeConfig,
    default_image_processor,
    extract_features,
    feature_cache_key,
    flatten_knn,
    knn_classify,
    knn_eval,
    knn_scores,
    topk_accuracy,
    train_linear_probe,
    unflatten_knn,
)
from training.evaluation import features as ev_features
from training.evaluation.splits import check_image_column

# --------------------------------------------------------------------------------------------------------------
# helpers


def tiny_dinov2(registers: int = 0, seed: int = 0, image_size: int = 28):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    kw = dict(image_size=image_size, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).eval()
    return Dinov2Model(Dinov2Config(**kw)).eval()


def photo_dataset(n_per_class: int = 4, seed: int = 0, size: int = 36) -> datasets.Dataset:
    """Random crops of three skimage photos (offline, no pooch), class = photo; in-memory `datasets.Dataset`."""
    import skimage.data as data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "camera": data.camera()}
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, array in enumerate(photos.values()):
        h, w = array.shape[:2]
        for _ in range(n_per_class):
            s = int(rng.integers(min(h, w) // 3, min(h, w)))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            images.append(Image.fromarray(array[y : y + s, x : x + s]).resize((size, size)))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(photos))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def reference_knn(train, train_labels, test, k, T, num_classes):
    """Straightforward per-sample transcription of the official protocol (full sort, ties by index)."""
    train, test = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    out = torch.zeros(len(test), num_classes, dtype=torch.float64)
    max_k = min(k, len(train))
    for i, t in enumerate(test):
        sims = (train @ t).tolist()
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:max_k]
        w = torch.softmax(torch.tensor([sims[j] for j in order]) / T, dim=0)
        for j, wj in zip(order, w):
            out[i, int(train_labels[j])] += wj
    return out


# --------------------------------------------------------------------------------------------------------------
# k-NN


def test_knn_known_answer_and_k_changes_vote():
    # test point [0, 1]: one class-1 neighbour at cosine 1, three class-0 neighbours at cosine 0.8, one at -1.
    train = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [0.0, -1.0]])
    labels = torch.tensor([1, 0, 0, 0, 2])
    test = torch.tensor([[0.0, 2.0]])  # not unit length: the protocol normalises
    scores = knn_scores(train, labels, test, num_classes=3, ks=(1, 4, 5), temperature=1.0, device="cpu")
    w = torch.softmax(torch.tensor([1.0, 0.8, 0.8, 0.8, -1.0]), dim=0)  # softmax over max(ks) = 5 neighbours
    torch.testing.assert_close(scores[1][0], torch.tensor([0.0, w[0], 0.0]))
    torch.testing.assert_close(scores[4][0], torch.tensor([3 * w[1], w[0], 0.0]))
    torch.testing.assert_close(scores[5][0], torch.tensor([3 * w[1], w[0], w[4]]))
    assert scores[1].argmax().item() == 1  # nearest neighbour alone says class 1
    assert scores[4].argmax().item() == 0  # three slightly farther class-0 neighbours outvote it
    acc = knn_classify(train, labels, test, torch.tensor([0]), num_classes=3, ks=(1, 4), temperature=1.0, device="cpu")
    assert acc == {"1": {"top1": 0.0, "top5": 100.0}, "4": {"top1": 100.0, "top5": 100.0}}


@pytest.mark.parametrize("labels", [[2, 0], [0, 2], [3, 1]])
def test_knn_equal_class_scores_go_to_lowest_class_index(labels):
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor(labels + [4])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, y, test, num_classes=5, ks=(2,), device="cpu")[2]
    assert scores[0, labels[0]] == scores[0, labels[1]]
    expected = min(labels)
    acc = topk_accuracy(scores, torch.tensor([expected]), ks=(1,))
    assert acc["top1"] == 100.0


def test_knn_equally_similar_neighbours_taken_in_train_order():
    # 5 identical train vectors (labels 4, 3, 2, 1, 0) hidden among 30 far ones; k = 1 and 3 use the first of
    # them in train order, also when the tie group crosses the top-k boundary (the fallback path).
    g = torch.Generator().manual_seed(0)
    far = -torch.rand(30, 4, generator=g) - 0.5  # all negative: cosine < 0 with the test point
    train = far.clone()
    labels = torch.randint(0, 5, (30,), generator=g)
    positions = [7, 12, 20, 25, 29]
    for pos, lab in zip(positions, [4, 3, 2, 1, 0]):
        train[pos], labels[pos] = torch.ones(4), lab
    test = torch.ones(1, 4)
    scores = knn_scores(train, labels, test, num_classes=5, ks=(1, 3), device="cpu")
    assert scores[1][0].argmax().item() == 4  # index 7 comes first
    nonzero = (scores[3][0] > 0).nonzero().flatten().tolist()
    assert nonzero == [2, 3, 4]  # indices 7, 12, 20
    assert ev.rank_classes(scores[3], 1).item() == 2  # equal weights: lowest class index


def test_knn_k_larger_than_train_set_uses_all_of_it():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.1]])
    scores = knn_scores(train, labels, test, num_classes=2, device="cpu")  # ks 10/20/100/200 > 3 samples
    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    w = torch.softmax(sims[0] / 0.07, dim=0)
    for k in ev.KNN_KS:
        torch.testing.assert_close(scores[k][0], torch.tensor([w[0], w[1] + w[2]]))
    results = knn_classify(train, labels, test, torch.tensor([0]), device="cpu")
    assert set(results) == {"10", "20", "100", "200"}
    assert all(r == {"top1": 100.0, "top5": 100.0} for r in results.values())


def test_knn_matches_reference_implementation():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(120, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 6, (120,), generator=g)
    scores = knn_scores(train, labels, test, num_classes=6, ks=(1, 10, 20, 100, 200), device="cpu", chunk_size=7)
    for k in (1, 10, 20, 100):
        # official: weights are a softmax over the max(ks) neighbours, class scores their partial sums over the
        # first k; renormalised per row they equal a softmax over the first k alone (the reference)
        ref = reference_knn(train, labels, test, k, 0.07, 6)
        ours = scores[k].double()
        torch.testing.assert_close(ours / ours.sum(1, keepdim=True), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(ev.rank_classes(scores[k], 1), ev.rank_classes(ref.float(), 1))
    # k = 200 > 120 train samples: everything, softmax over all of them
    torch.testing.assert_close(scores[200].double(), reference_knn(train, labels, test, 200, 0.07, 6), atol=1e-5,
                               rtol=1e-5)


def test_topk_accuracy_rules():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.2, 0.9]])
    assert topk_accuracy(scores, torch.tensor([0, 2])) == {"top1": 100.0, "top5": 100.0}  # 3 classes: top-5 = all
    assert topk_accuracy(scores, torch.tensor([1, 1]), ks=(1, 2)) == {"top1": 0.0, "top2": 100.0}


# --------------------------------------------------------------------------------------------------------------
# linear probe


def separable(n_per_class: int, seed: int, dim: int = 24, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    x = torch.cat([c + torch.randn(n_per_class, dim, generator=g) for c in centers])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    scale = torch.logspace(-2, 2, dim)  # badly scaled dims and a big offset: standardisation must handle them
    return x * scale + 50.0, y


def test_linear_probe_reaches_100_percent_on_separable_features():
    x, y = separable(40, seed=0)
    xt, yt = separable(20, seed=1)
    head = train_linear_probe(x, y, num_classes=5, device="cpu", config=LinearProbeConfig(min_steps=150))
    acc = topk_accuracy(head(xt), yt)
    assert acc["top1"] >= 99.0, acc
    assert len(head.grid) == 12 and head.val_top1 == max(r["val_top1"] for r in head.grid)
    assert head.weight.shape == (5, 24) and head.bias.shape == (5,)


def test_linear_probe_invariant_to_feature_scaling_and_uses_given_val_split():
    # Standardisation is folded into the head: training on 10x+3 gives the same classifier on raw inputs.
    x, y = separable(15, seed=2, dim=8, classes=3)
    xv, yv = separable(5, seed=3, dim=8, classes=3)
    cfg = LinearProbeConfig(learning_rates=(0.1,), weight_decays=(0.0, 1e-3), min_steps=100)
    a = train_linear_probe(x, y, num_classes=3, val_features=xv, val_labels=yv, config=cfg, device="cpu")
    b = train_linear_probe(10 * x + 3, y, num_classes=3, val_features=10 * xv + 3, val_labels=yv, config=cfg,
                           device="cpu")
    torch.testing.assert_close(a(x), b(10 * x + 3), atol=2e-3, rtol=2e-3)
    assert len(a.grid) == 2 and a.grid[0]["val_top1"] == 100.0


# --------------------------------------------------------------------------------------------------------------
# feature extraction and cache


@pytest.mark.parametrize("registers", [0, 4])
def test_extract_features_cls_and_patch_mean_without_registers(registers):
    model = tiny_dinov2(registers)
    ds = photo_dataset(2)
    proc = default_image_processor(28)
    # registers case: one worker process and the split preprocessing (uint8 crops, normalised on the device)
    feats = extract_features(model, ds, image_processor=proc, batch_size=4, num_workers=1 if registers else 0,
                             device="cpu", progress=False, split_preprocessing=bool(registers))
    pixel_values = proc([im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(feats.cls, hidden[:, 0])
    torch.testing.assert_close(feats.patch_mean, hidden[:, 1 + registers :].mean(1))
    assert feats.labels.tolist() == ds["label"]
    assert feats.features("cls_avgpool").shape == (len(ds), 64)


def test_feature_cache_reused_and_invalidated_when_model_changes(tmp_path, monkeypatch):
    from transformers import AutoModel

    tiny_dinov2(seed=0).save_pretrained(tmp_path / "m")
    ds = photo_dataset(2)
    proc = default_image_processor(28)
    cache = FeatureCache(tmp_path / "cache")
    calls = []
    real_forward = ev_features.forward_features
    monkeypatch.setattr(ev_features, "forward_features", lambda m, x: calls.append(1) or real_forward(m, x))

    def run(model, dataset=ds, processor=proc):
        key = feature_cache_key(model, dataset, image_processor=processor, image_column="image",
                                label_column="label", dtype="fp32")
        return key, extract_features(model, dataset, image_processor=processor, num_workers=0, device="cpu",
                                     progress=False, cache=cache, cache_key=key)

    model = AutoModel.from_pretrained(tmp_path / "m")
    key1, f1 = run(model)
    n_calls = len(calls)
    assert n_calls > 0 and cache.path(key1).is_file()
    key2, f2 = run(AutoModel.from_pretrained(tmp_path / "m"))  # same weights, reloaded: cache hit
    assert key2 == key1 and len(calls) == n_calls
    torch.testing.assert_close(f2.cls, f1.cls)

    with torch.no_grad():  # change the model on disk: new key, recomputed, different features
        model.layernorm.bias.add_(0.5)
    model.save_pretrained(tmp_path / "m")
    key3, f3 = run(AutoModel.from_pretrained(tmp_path / "m"))
    assert key3 != key1 and len(calls) > n_calls
    assert not torch.allclose(f3.cls, f1.cls)
    # other data or other preprocessing: other keys
    assert run(model, dataset=photo_dataset(2, seed=5))[0] != key3
    assert run(model, processor=default_image_processor(42))[0] != key3
    assert len(list((tmp_path / "cache").glob("*.tmp"))) == 0


def _features(n: int, dim: int = 256) -> FeatureSet:
    return FeatureSet(cls=torch.randn(n, dim), patch_mean=torch.randn(n, dim), labels=torch.zeros(n, dtype=torch.long))


def test_feature_cache_evicts_least_recently_used(tmp_path):
    entry = FeatureCache(tmp_path / "sizing", max_bytes=None).save("s" * 64, _features(8))
    size = entry.stat().st_size
    entry.unlink()
    cache = FeatureCache(tmp_path, max_bytes=2 * size + size // 2)  # room for two entries, not three
    a, b = cache.save("a" * 64, _features(8)), cache.save("b" * 64, _features(8))
    os.utime(a, (1_000, 1_000))  # a written long before b ...
    os.utime(b, (2_000, 2_000))
    assert cache.load("a" * 64) is not None  # ... but read since: b is now the least recently used
    c = cache.save("c" * 64, _features(8))
    assert sorted(p.name for p in cache.entries()) == sorted([a.name, c.name])
    assert cache.load("b" * 64) is None and cache.size_bytes() <= cache.max_bytes
    # an entry larger than the whole limit is still kept (it is the one in use), everything older goes
    tiny = FeatureCache(tmp_path, max_bytes=1)
    d = tiny.save("d" * 64, _features(8))
    assert tiny.entries() == [d]
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(tmp_path, max_bytes=-1)


def test_feature_cache_clear_removes_only_its_own_files(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.save("k" * 64, _features(2))
    (tmp_path / "tmpabc.tmp").write_text("interrupted write")
    (tmp_path / "notes.txt").write_text("the user's file")
    assert cache.clear() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert FeatureCache(tmp_path / "missing").clear() == 0


def test_extract_features_decodes_with_the_project_decoder(monkeypatch):
    import training.data

    calls = []
    real = training.data.decode_image
    monkeypatch.setattr(ev_features, "decode_image", lambda v, **kw: calls.append(1) or real(v, **kw))
    ds = photo_dataset(1)
    extract_features(tiny_dinov2(), ds, image_processor=default_image_processor(28), num_workers=0, device="cpu",
                     progress=False)
    assert len(calls) == len(ds)


def test_unflatten_knn_inverts_flatten_knn():
    knn = {"10": {"top1": 40.0, "top5": 80.0}, "20": {"top1": 45.0, "top5": 85.0}}
    flat = flatten_knn(knn)
    assert flat["knn/top1"] == 45.0 and unflatten_knn(flat) == knn
    assert unflatten_knn({"knn/top1": 1.0, "knn/top5": 2.0, "step": 3}) == {"20": {"top1": 1.0, "top5": 2.0}}
    with pytest.raises(ValueError, match="not a flat k-NN metric"):
        unflatten_knn({"knn/accuracy": 1.0})


def test_probe_config_rejects_bad_options():
    with pytest.raises(EvaluationError, match="--dtype"):
        ProbeConfig(model="m", dataset="d", dtype="int8")
    with pytest.raises(EvaluationError, match="--ks"):
        ProbeConfig(model="m", dataset="d", ks=(0, 20))
    with pytest.raises(EvaluationError, match="output_dir"):
        ProbeConfig(model="m", dataset="d", export_classifier=True)
    assert ProbeConfig(model="m", dataset="d", ks=[10, 20]).ks == (10, 20)


# --------------------------------------------------------------------------------------------------------------
# errors


def test_clear_errors_for_bad_inputs():
    ds = photo_dataset(1)
    with pytest.raises(EvaluationError, match="no label column 'label'.*--label_column"):
        ev.resolve_labels(ds.remove_columns("label"), {}, "label")
    with pytest.raises(EvaluationError, match="no image column 'img'"):
        check_image_column(ds, "img", "the train split")

    good = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    broken = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image", "path": "broken.jpg"}], "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}),
    )
    with pytest.raises(EvaluationError, match="broken.jpg"):
        extract_features(tiny_dinov2(), broken, image_processor=default_image_processor(28), num_workers=0,
                         device="cpu", progress=False)

    from transformers import ConvNextConfig, ConvNextModel, ViTConfig, ViTModel

    convnet = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).eval()
    pooled, mean = ev.forward_features(convnet, torch.randn(1, 3, 28, 28))  # CNNs: pooled features, no CLS needed
    assert pooled.shape == mean.shape == (1, 16)
    with pytest.raises(EvaluationError, match="multiple of the patch size 14"):
        ev.forward_features(tiny_dinov2(), torch.randn(1, 3, 30, 30))
    vit = ViTModel(ViTConfig(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32), add_pooling_layer=False).eval()
    with pytest.raises(EvaluationError, match="--image_size 28"):  # fixed position embeddings, wrong size
        ev.forward_features(vit, torch.randn(1, 3, 42, 42))
    cls, patch_mean = ev.forward_features(vit, torch.randn(2, 3, 28, 28))  # any ViT with a CLS works
    assert cls.shape == patch_mean.shape == (2, 16)


# --------------------------------------------------------------------------------------------------------------
# in-training k-NN


def test_knn_eval_in_memory_restores_mode():
    model = tiny_dinov2()
    model.train()
    train, test = photo_dataset(3), photo_dataset(2, seed=1)
    metrics = knn_eval(model, train, test, image_size=28, batch_size=4, num_workers=0)
    assert model.training  # mode restored
    assert set(metrics) == {"knn/top1", "knn/top5"} | {f"knn/k{k}/top{t}" for k in ev.KNN_KS for t in (1, 5)}
    assert metrics["knn/top1"] == metrics["knn/k20/top1"] and 0.0 <= metrics["knn/top1"] <= 100.0


def _knn_two_process_worker(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    metrics = knn_eval(tiny_dinov2(), photo_dataset(3), photo_dataset(1, seed=1).select(range(3)), image_size=28,
                       batch_size=2, num_workers=0, accelerator=accelerator)
    train = extract_features(tiny_dinov2(), photo_dataset(3), image_processor=default_image_processor(28),
                             batch_size=2, num_workers=0, accelerator=accelerator, progress=False)
    torch.save({"metrics": metrics, "cls": train.cls, "labels": train.labels}, f"{result_path}.{rank}")
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two-process kNN: the curation pipeline's two-process test stays fast
def test_knn_eval_two_processes_matches_one(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_knn_two_process_worker, args=(port, str(tmp_path / "r")), nprocs=2)
    single = knn_eval(tiny_dinov2(), photo_dataset(3), photo_dataset(1, seed=1).select(range(3)), image_size=28,
                      num_workers=0)
    ref = extract_features(tiny_dinov2(), photo_dataset(3), image_processor=default_image_processor(28),
                           num_workers=0, device="cpu", progress=False)
    for rank in range(2):
        r = torch.load(tmp_path / f"r.{rank}", weights_only=True)
        assert r["metrics"] == single
        torch.testing.assert_close(r["cls"], ref.cls, atol=1e-5, rtol=1e-5)  # 9 rows over 2 ranks: padded shards
        assert r["labels"].tolist() == ref.labels.tolist()


# --------------------------------------------------------------------------------------------------------------
# classifier export (training.classifier)


@pytest.mark.parametrize("kind", ["stock", "registers", "dinoforge"])
def test_export_classifier_loads_as_stock_model(tmp_path, kind):
    from transformers import AutoModelForImageClassification

    if kind == "dinoforge":
        from modeling import DinoVisionConfig, DinoVisionModel

        torch.manual_seed(0)
        backbone = DinoVisionModel(DinoVisionConfig(image_size=28, patch_size=14, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2)).eval()
        prefix = 1
    else:
        backbone = tiny_dinov2(4 if kind == "registers" else 0)
        prefix = 5 if kind == "registers" else 1
    g = torch.Generator().manual_seed(0)
    head = LinearHead(weight=torch.randn(3, 64, generator=g), bias=torch.randn(3, generator=g),
                      feature="cls_avgpool", learning_rate=0.1, weight_decay=0.0)
    folder = export_classifier_model(backbone, head, tmp_path / "clf", class_names=["a", "b", "c"],
                                        image_processor=default_image_processor(28))
    clf = AutoModelForImageClassification.from_pretrained(folder).eval()
    expected_cls = "Dinov2WithRegistersForImageClassification" if kind == "registers" else \
        "Dinov2ForImageClassification"
    assert type(clf).__name__ == expected_cls
    assert clf.config.id2label == {0: "a", 1: "b", 2: "c"} and clf.config.label2id["c"] == 2
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = backbone(pixel_values=x).last_hidden_state
        logits = clf(pixel_values=x).logits
    expected = head(torch.cat([hidden[:, 0], hidden[:, prefix:].mean(1)], dim=1))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(EvaluationError, match="cls_avgpool"):
        export_classifier_model(backbone, LinearHead(torch.zeros(3, 32), torch.zeros(3), "cls", 0.1, 0.0),
                                   tmp_path / "x", class_names=["a", "b", "c"])
    assert math.isfinite(float(logits.sum()))
