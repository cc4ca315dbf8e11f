"""Diagnostics for the `objects` benchmark (docs/small_data.md, "What stops learning, isolated"): a small
self-contained training loop, outside train.py, to ask which part stops self-supervised learning of content.

    python benchmarks/small_data_diagnostics.py --data plain --objective simclr --steps 300
    python benchmarks/small_data_diagnostics.py --objective simclr --swap truth --size 32 --steps 1000 --eval_every 200
    python benchmarks/small_data_diagnostics.py --objective simclr --swap saliency --size 32 --steps 1000
    python benchmarks/small_data_diagnostics.py --swap saliency --size 32 --steps 3000 --eval_every 500   # 34 %
    python benchmarks/small_data_diagnostics.py --write_plain /tmp/plain   # for train.py: data.dataset=/tmp/plain

* `--data objects` is the benchmark; `--data plain` renders the same kinds of shapes on flat single-colour
  backgrounds (a diagnostic set, never a benchmark).
* `--objective simclr` (NT-Xent over both views), `moco` (MoCo v3: predictor, momentum keys) or `supervised`
  (cross-entropy on the labels: what the budget allows when the signal is right).
* `--swap truth` pastes each object, by its *ground-truth* mask (replayed from the set's own random streams and
  checked pixel-equal to the stored images), onto a crop of a training photo: an upper bound unavailable on real
  data. `--swap saliency` uses the unsupervised masks and backgrounds of training/data/background_swap.py.
* `--arch cnn` is a 4-stage CNN (`--width` 16: 0.29 M parameters); `--arch textnet` the same shape as a stock
  transformers `TextNetModel` (train.py's `model.arch: textnet`); `--arch resnet` a transformers `ResNetModel`
  (basic blocks, `--widths`); `--arch convnext` a transformers `ConvNextModel` (stem `--patch`); `--arch superpoint`
  the encoder of transformers' SuperPoint (the `cnn` shape without BatchNorm, on the views' luminance).
* `--flat q`: with a swap, a view's new background is one flat random colour with probability q.

Prints kNN top-1 (k = 20, the probe's weighted vote) of the backbone's pooled features on the test split every
`--eval_every` steps. Views: random-resized crop, flip, optional rotation, colour jitter with a hue rotation of
any angle (p 0.8), grey p 0.2, all on batches. Minutes per run on 2 cores; never part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluation import knn_classify  # noqa: E402
from training.objects_data import OBJECT_CLASSES, OBJECT_SPLITS, build_objects_dataset, render_object  # noqa: E402


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    root = build_objects_dataset() / split
    images, labels = [], []
    for label, name in enumerate(OBJECT_CLASSES):
        for path in sorted((root / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels)


def _plain_images(seed: list[int], count: int):
    """`(class name, index, image)`: `count` per class of the shape generator on flat single-colour backgrounds."""
    rng = np.random.default_rng(seed)
    for name in OBJECT_CLASSES:
        for i in range(count):
            background = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(0, 256, 3)))
            yield name, i, render_object(name, background, rng)


def plain_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain set in memory: 80 per class for train (seed [7, 0]), 40 for test (seed [7, 1])."""
    seed, count = ([7, 0], 80) if split == "train" else ([7, 1], 40)
    rows = list(_plain_images(seed, count))
    images = np.stack([np.asarray(image) for _, _, image in rows])
    labels = torch.tensor([OBJECT_CLASSES.index(name) for name, _, _ in rows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, labels


def write_plain(root: Path) -> None:
    """The plain set as an image folder (train / validation / test, seeds [7, split number]) for train.py runs:
    `data.dataset=<root>`."""
    for split_id, (split, count) in enumerate(OBJECT_SPLITS.items()):
        for name, i, image in _plain_images([7, split_id], count):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{name}_{i:04d}.png")


def true_masks_and_photo_crops(train: torch.Tensor, count: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth masks of the training split (`objects_data.iter_split`, checked against the stored pixels),
    and `count` random crops of the training photos as new backgrounds."""
    from training import objects_data as od

    photos = {name: od._load_photo(name) for name in od._TRAIN_PHOTOS}
    masks = []
    for index, (_, _, image, mask) in enumerate(od.iter_split("train", photos)):
        if not np.array_equal(np.asarray(image), (train[index].permute(1, 2, 0) * 255).round().byte().numpy()):
            raise SystemExit("the regenerated image differs from the stored one: objects_data changed")
        masks.append(np.asarray(mask))
    backgrounds = [photos[name] for name in od._TRAIN_PHOTOS]
    rng = np.random.default_rng(3)
    crops = [np.asarray(od._random_crop(backgrounds[int(rng.integers(len(backgrounds)))], rng)) for _ in range(count)]
    return (torch.from_numpy(np.stack(masks)).float()[:, None] / 255,
            torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255)


def saliency_masks_and_windows(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """training/data/background_swap.py's masks, and each training image's least-salient window as a background."""
    from training.data.background_swap import _least_salient_window, foreground_masks

    images = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in train]
    masks = foreground_masks(images)
    windows = np.stack([_least_salient_window(im, m, im.width) for im, m in zip(images, masks)])
    return (torch.from_numpy(masks).float()[:, None],
            torch.from_numpy(windows).permute(0, 3, 1, 2).float() / 255)


def affine_views(x: torch.Tensor, scale: tuple[float, float], rotation: float, size: int) -> torch.Tensor:
    """Random-resized crop (aspect 3/4..4/3), flip and rotation by up to `rotation` degrees, per image."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale)
    ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)))
    sx, sy = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
    angle = torch.empty(b).uniform_(-rotation, rotation) * math.pi / 180
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * sx * flip, -torch.sin(angle) * sy
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * sx * flip, torch.cos(angle) * sy
    theta[:, 0, 2], theta[:, 1, 2] = (torch.rand(b) * 2 - 1) * (1 - sx), (torch.rand(b) * 2 - 1) * (1 - sy)
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour(x: torch.Tensor) -> torch.Tensor:
    """Brightness / contrast / saturation 0.6..1.4, a hue rotation of any angle about the grey axis (p 0.8), grey
    p 0.2."""
    b = x.shape[0]

    def factor() -> torch.Tensor:
        return torch.empty(b, 1, 1, 1).uniform_(0.6, 1.4)

    def grey(t: torch.Tensor) -> torch.Tensor:
        return 0.299 * t[:, :1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:]

    x = x * factor()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    x = (x - grey(x)) * factor() + grey(x)
    k = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = (torch.rand(b) * 2 * math.pi)[:, None, None]
    rotation = torch.eye(3) + torch.sin(angle) * cross + (1 - torch.cos(angle)) * (cross @ cross)
    rotation = torch.where((torch.rand(b) < 0.8)[:, None, None], rotation, torch.eye(3))
    x = torch.einsum("bij,bjhw->bihw", rotation, x)
    to_grey = (torch.rand(b, 1, 1, 1) < 0.2).float()
    return (to_grey * grey(x).expand_as(x) + (1 - to_grey) * x).clamp(0, 1)


def cnn(width: int, strided: bool = False) -> nn.Module:
    """Four stages of two 3x3 conv-BN-ReLU; 2x2 max-pooling between them, or with `strided` a stride-2 first conv
    (TextNet's way)."""
    def stage(i: int, o: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    w = width
    if strided:
        return nn.Sequential(*stage(3, w), *stage(w, 2 * w, 2), *stage(2 * w, 4 * w, 2), *stage(4 * w, 8 * w, 2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(*stage(3, w), nn.MaxPool2d(2), *stage(w, 2 * w), nn.MaxPool2d(2), *stage(2 * w, 4 * w),
                         nn.MaxPool2d(2), *stage(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ResNet(nn.Module):
    """transformers' `ResNetModel` (basic blocks, one per stage; `widths` 32..256 by default), or with `convnext`
    its `ConvNextModel` (one block per stage, stem patch size `patch`)."""

    def __init__(self, widths: list[int], convnext: bool = False, patch: int = 1) -> None:
        super().__init__()
        from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel

        self.model = (ConvNextModel(ConvNextConfig(patch_size=patch, hidden_sizes=widths, depths=[1, 1, 1, 1]))
                      if convnext else
                      ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=widths, depths=[1, 1, 1, 1],
                                               layer_type="basic")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output.flatten(1)


class TextNet(nn.Module):
    """train.py's `model.arch: textnet` (`training.methods.two_view.textnet_config`) shaped like `cnn(width)`: a
    stride-1 3x3 stem, then stages of 3x3 RepVGG-style conv-BN-ReLU layers with a stride-2 first layer instead of
    max-pooling; global average pool."""

    def __init__(self, width: int, branches: bool = True, depths: list[int] = (1, 2, 2, 2), down: int = 3) -> None:
        super().__init__()
        from modeling.two_view import build_backbone
        from training.methods.two_view import textnet_config

        w = width
        self.model = build_backbone(textnet_config(list(depths), [w, 2 * w, 4 * w, 8 * w], branches=branches,
                                                   downsample_kernel=down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from modeling.two_view import pooled_features

        return pooled_features(self.model, x)


class SuperPointEncoder(nn.Module):
    """The encoder of transformers' `SuperPointForKeypointDetection` (widths `width`..8 `width`): four stages of two
    3x3 conv-ReLU, 2x2 max-pooling between them, no normalisation, one grey input channel (the views' luminance);
    PyTorch's default init."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from transformers import SuperPointConfig, SuperPointForKeypointDetection

        w = width
        model = SuperPointForKeypointDetection(SuperPointConfig(encoder_hidden_sizes=[w, 2 * w, 4 * w, 8 * w]))
        self.encoder = model.encoder
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
        return self.encoder(grey).last_hidden_state.mean((2, 3))


def mlp(i: int, hidden: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, o))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("objects", "plain"), default="objects")
    p.add_argument("--objective", choices=("simclr", "moco", "supervised"), default="simclr")
    p.add_argument("--swap", choices=("none", "truth", "saliency"), default="none")
    p.add_argument("--flat", type=float, default=0.0,
                   help="with --swap: probability that a view's new background is one flat random colour")
    p.add_argument("--arch", choices=("cnn", "resnet", "convnext", "textnet", "superpoint"), default="cnn")
    p.add_argument("--strided", action="store_true", help="cnn: stride-2 convs instead of max-pooling")
    p.add_argument("--torch_init", action="store_true", help="textnet: PyTorch's default init, not TextNet's")
    p.add_argument("--depths", type=int, nargs=4, default=(1, 2, 2, 2), help="textnet layers per stage")
    p.add_argument("--down", type=int, default=3, help="textnet: kernel of each later stage's stride-2 first layer")
    p.add_argument("--no_branches", action="store_true", help="textnet without RepVGG's training-time branches")
    p.add_argument("--widths", type=int, nargs=4, default=(32, 64, 128, 256), help="resnet / convnext stage widths")
    p.add_argument("--patch", type=int, default=1, help="convnext stem patch size")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="view (and evaluation) size in pixels")
    p.add_argument("--scale", type=float, nargs=2, default=(0.3, 1.0))
    p.add_argument("--rotation", type=float, default=0.0, help="largest rotation, degrees")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--momentum", type=float, default=0.99, help="moco: key encoder EMA")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write_plain", type=Path, help="write the plain set as an image folder there and exit")
    args = p.parse_args()
    if args.write_plain:
        write_plain(args.write_plain)
        return
    if args.swap != "none" and args.data != "objects":
        p.error("--swap needs --data objects")
    torch.manual_seed(args.seed)

    split = load_split if args.data == "objects" else plain_split
    (x_train, y_train), (x_test, y_test) = split("train"), split("test")
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    masks = backgrounds = None
    if args.swap == "truth":
        masks, backgrounds = true_masks_and_photo_crops(x_train)
    elif args.swap == "saliency":
        masks, backgrounds = saliency_masks_and_windows(x_train)

    def view(index: torch.Tensor) -> torch.Tensor:
        x = x_train[index]
        if masks is not None:  # each view its own new background
            m = masks[index]
            new = backgrounds[torch.randint(len(backgrounds), (len(index),))]
            new = F.interpolate(new, size=x.shape[-2:], mode="bilinear", align_corners=False)
            flat = (torch.rand(len(index), 1, 1, 1) < args.flat).float()
            new = flat * torch.rand(len(index), 3, 1, 1) + (1 - flat) * new
            x = m * x + (1 - m) * new
        return (colour(affine_views(x, tuple(args.scale), args.rotation, args.size)) - mean) / std

    backbone = (cnn(args.width, args.strided) if args.arch == "cnn" else SuperPointEncoder(args.width)
                if args.arch == "superpoint" else TextNet(args.width, not args.no_branches, args.depths, args.down) if args.arch == "textnet" else
                ResNet(list(args.widths), convnext=args.arch == "convnext", patch=args.patch))
    if args.torch_init:
        for m in backbone.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()
    dim = 8 * args.width if args.arch in ("cnn", "textnet", "superpoint") else args.widths[-1]
    projector = mlp(dim, 512, 128)
    heads = nn.ModuleDict({"classifier": nn.Linear(dim, len(OBJECT_CLASSES))} if args.objective == "supervised"
                          else {"predictor": mlp(128, 512, 128)} if args.objective == "moco" else {})
    params = [*backbone.parameters(), *projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    if args.objective == "moco":
        key_backbone, key_projector = copy.deepcopy(backbone), copy.deepcopy(projector)
        for q in [*key_backbone.parameters(), *key_projector.parameters()]:
            q.requires_grad_(False)

    @torch.no_grad()
    def knn() -> float:
        backbone.eval()

        def features(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != args.size:
                x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", antialias=True, align_corners=False)
            return F.normalize(backbone((x - mean) / std), dim=1)

        train_f = torch.cat([features(x_train[i:i + 256]) for i in range(0, len(x_train), 256)])
        test_f = torch.cat([features(x_test[i:i + 256]) for i in range(0, len(x_test), 256)])
        backbone.train()
        return knn_classify(train_f, y_train, test_f, y_test, ks=(20,))["20"]["top1"]

    print(f"step 0 kNN {knn():.1f}", flush=True)
    start = time.time()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(x_train), (args.batch_size,))
        v1, v2 = view(index), view(index)
        if args.objective == "supervised":
            loss = F.cross_entropy(heads["classifier"](backbone(v1)), y_train[index])
        elif args.objective == "simclr":
            z = F.normalize(projector(backbone(torch.cat([v1, v2]))), dim=1)
            logits = z @ z.T / args.temperature
            logits.fill_diagonal_(float("-inf"))
            n = args.batch_size
            loss = F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
        else:
            q1, q2 = (heads["predictor"](projector(backbone(v))) for v in (v1, v2))
            with torch.no_grad():
                k1, k2 = (key_projector(key_backbone(v)) for v in (v1, v2))

            def contrast(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
                logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / args.temperature
                return F.cross_entropy(logits, torch.arange(len(q))) * 2 * args.temperature

            loss = contrast(q1, k2) + contrast(q2, k1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if args.objective == "moco":
            with torch.no_grad():
                for online, key in ((backbone, key_backbone), (projector, key_projector)):
                    for a, b in zip(online.parameters(), key.parameters()):
                        b.mul_(args.momentum).add_(a, alpha=1 - args.momentum)
                    for a, b in zip(online.buffers(), key.buffers()):
                        b.copy_(a)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.3f} kNN {knn():.1f} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
