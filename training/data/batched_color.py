"""The photometric half of the two-view augmentation, run on a whole batch of tensors with per-image parameters.

Why: on small images the per-image PIL pipeline spends most of its time in colour jitter, `ToTensor` and
`Normalize` (0.55 of 0.8 ms a 32 px view on one core, profiled in docs/small_data.md), and one data worker could
not keep up with a small CNN. Here each image's parameters are drawn where its crop is (per sample, from the
sample's seeded generator, so a resumed run sees the same views) and the ops run once per batch in the collate.

The ops are torchvision's tensor ops with per-image factors (`torchvision.transforms.functional` on a float
image in [0, 1]): brightness, contrast, saturation, hue (HSV) in the image's own random order, each clamped to
[0, 1]; grayscale as `rgb_to_grayscale` (0.2989, 0.587, 0.114) on three channels; Gaussian blur with a sampled σ
(a true Gaussian, 3σ radius, reflect padding, where the PIL pipeline uses PIL's box approximation); solarize
inverts values ≥ 128/255. They differ from the PIL pipeline by its rounding to uint8 after every op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["NUM_COLOR_PARAMS", "BatchedColor", "draw_color_params"]

# Per view: jitter on, brightness, contrast, saturation, hue, the jitter order (4), grayscale on, blur σ (0 = no
# blur), solarize on.
NUM_COLOR_PARAMS = 12
_GREY = (0.2989, 0.587, 0.114)


def draw_color_params(
    color_jitter: Sequence[float], jitter_probability: float, grayscale_probability: float, blur_probability: float,
    blur_sigma: Sequence[float], solarize_probability: float,
) -> torch.Tensor:
    """One view's parameters ``[NUM_COLOR_PARAMS]``, drawn from torch's default generator (the caller seeds it)
    in a fixed number of draws, whatever the coins show."""
    brightness, contrast, saturation, hue = color_jitter
    draws = torch.rand(9).tolist()
    order = torch.randperm(4).tolist()

    def factor(u: float, amount: float) -> float:  # torchvision: uniform in [max(0, 1 - a), 1 + a]
        low = max(0.0, 1 - amount)
        return low + u * (1 + amount - low)

    sigma = blur_sigma[0] + draws[6] * (blur_sigma[1] - blur_sigma[0])
    return torch.tensor([
        float(draws[0] < jitter_probability),
        factor(draws[1], brightness), factor(draws[2], contrast), factor(draws[3], saturation),
        (draws[4] * 2 - 1) * hue,
        *order,
        float(draws[5] < grayscale_probability),
        sigma if draws[7] < blur_probability else 0.0,
        float(draws[8] < solarize_probability),
    ])


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (_GREY[0] * x[:, 0] + _GREY[1] * x[:, 1] + _GREY[2] * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    high, low = x.max(1).values, x.min(1).values
    chroma = high - low
    equal = high == low
    safe_chroma = torch.where(equal, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(equal, torch.ones_like(high), high)
    rc, gc, bc = (high - r) / safe_chroma, (high - g) / safe_chroma, (high - b) / safe_chroma
    h = torch.where(high == r, bc - gc, torch.zeros_like(high))
    h = h + torch.where((high == g) & (high != r), 2.0 + rc - bc, torch.zeros_like(high))
    h = h + torch.where((high != g) & (high != r), 4.0 + gc - rc, torch.zeros_like(high))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, high), 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    # sector i takes (r, g, b) from these columns of (v, q, p, t)
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]])
    options = torch.stack((v, q, p, t), 1)  # [B, 4, H, W]
    index = table[i].permute(0, 3, 1, 2)  # [B, 3, H, W]
    return options.gather(1, index)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift[:, 0]) % 1.0
    return _hsv_to_rgb(hsv)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, largest_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, σ per image (``sigma`` ``[B]``, all > 0), one kernel length for the batch."""
    b, c, h, w = x.shape
    radius = min(math.ceil(3 * largest_sigma), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


class BatchedColor:
    """``(images [B, 3, H, W], params [B, NUM_COLOR_PARAMS]) -> normalised float [B, 3, H, W]`` (module docstring);
    images are uint8 or float in [0, 1].
    ``largest_sigma`` sets the blur kernel's radius (3σ)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], largest_sigma: float = 2.0) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.largest_sigma = largest_sigma

    def __repr__(self) -> str:
        return f"BatchedColor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.clone()
        p = params[:, :, None, None]
        jitter = params[:, 0] > 0
        ops = (
            lambda x, f: (f * x).clamp(0, 1),  # brightness
            lambda x, f: _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), f),  # contrast
            lambda x, f: _blend(x, _grey(x), f),  # saturation
            _adjust_hue,
        )
        for position in range(4):
            for op_index, op in enumerate(ops):
                factor = params[:, 1 + op_index]
                identity = factor == (0 if op_index == 3 else 1)  # e.g. hue 0 in the config: torchvision skips it
                chosen = torch.nonzero(jitter & (params[:, 5 + position] == op_index) & ~identity).flatten()
                if len(chosen):
                    x[chosen] = op(x[chosen], p[chosen, 1 + op_index : 2 + op_index])
        grey = torch.nonzero(params[:, 9] > 0).flatten()
        if len(grey):
            x[grey] = _grey(x[grey]).expand(-1, 3, -1, -1)
        blurred = torch.nonzero(params[:, 10] > 0).flatten()
        if len(blurred):
            x[blurred] = _gaussian_blur(x[blurred], params[blurred, 10], self.largest_sigma)
        solarized = torch.nonzero(params[:, 11] > 0).flatten()
        if len(solarized):
            x[solarized] = torch.where(x[solarized] >= 128 / 255, 1 - x[solarized], x[solarized])
        return (x - self.mean) / self.std
