"""Small helpers shared by several test modules."""

import torch

from modeling.vision_transformer import DinoVisionConfig, DinoVisionModel


def randomized(config: DinoVisionConfig, seed: int = 0) -> DinoVisionModel:
    """A backbone whose every parameter is random (eval mode), so equality tests are sensitive to all of them."""
    model = DinoVisionModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # gammas and norm weights around 1 (so blocks matter), everything else small and random
            p.copy_(1.0 + 0.3 * noise if name.endswith(("gamma", "norm1.weight", "norm2.weight")) else 0.2 * noise)
    return model
