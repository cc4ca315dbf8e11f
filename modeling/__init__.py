"""dinoforge.modeling: networks and losses (no data loading, no loops).

Importing this package registers the dinoforge classes with transformers' Auto classes, so
`AutoConfig` / `AutoModel` / `AutoModelForPreTraining.from_pretrained` load our folders.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from . import convert, losses
from .barlow_twins import BarlowTwinsConfig, BarlowTwinsForPretraining
from .densecl import DenseCLConfig, DenseCLForPretraining
from .heads import DinoHead
from .mocov3 import MoCoV3Config, MoCoV3ForPretraining
from .pretraining import DinoForPretraining, DinoPretrainingConfig, DinoPretrainingOutput
from .vision_transformer import DinoVisionConfig, DinoVisionModel

AutoConfig.register(DinoVisionConfig.model_type, DinoVisionConfig, exist_ok=True)
AutoModel.register(DinoVisionConfig, DinoVisionModel, exist_ok=True)
AutoConfig.register(DinoPretrainingConfig.model_type, DinoPretrainingConfig, exist_ok=True)
AutoModel.register(DinoPretrainingConfig, DinoForPretraining, exist_ok=True)
AutoModelForPreTraining.register(DinoPretrainingConfig, DinoForPretraining, exist_ok=True)
for _config, _model in ((MoCoV3Config, MoCoV3ForPretraining), (BarlowTwinsConfig, BarlowTwinsForPretraining),
                        (DenseCLConfig, DenseCLForPretraining)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForPreTraining.register(_config, _model, exist_ok=True)

# Saved folders carry `auto_map`, so a Hub copy also loads with `trust_remote_code=True` without dinoforge.
DinoVisionConfig.register_for_auto_class()
DinoVisionModel.register_for_auto_class("AutoModel")
DinoPretrainingConfig.register_for_auto_class()
DinoForPretraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "BarlowTwinsConfig",
    "BarlowTwinsForPretraining",
    "DenseCLConfig",
    "DenseCLForPretraining",
    "DinoForPretraining",
    "DinoHead",
    "DinoPretrainingConfig",
    "DinoPretrainingOutput",
    "DinoVisionConfig",
    "DinoVisionModel",
    "MoCoV3Config",
    "MoCoV3ForPretraining",
    "convert",
    "losses",
]
