"""dinoforge.modeling: networks and losses (no data loading, no loops).

Importing this package registers the dinoforge classes with transformers' Auto classes, so
`AutoConfig` / `AutoModel` / `AutoModelForPreTraining.from_pretrained` load our folders.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from . import convert, losses
from .barlow_twins import BarlowTwinsConfig, BarlowTwinsForPretraining
from .copy_detection import CopyDetectionConfig, CopyDetectionForPretraining
from .densecl import DenseCLConfig, DenseCLForPretraining
from .distillation import DistillDinoConfig, DistillDinoForPretraining
from .dual_encoder import DualEncoderConfig, DualEncoderModel
from .feature_distillation import FeatureDistillConfig, FeatureDistillForPretraining
from .grounding import GroundingConfig, GroundingForPretraining
from .heads import DinoHead
from .mocov3 import MoCoV3Config, MoCoV3ForPretraining
from .pretraining import DinoForPretraining, DinoPretrainingConfig, DinoPretrainingOutput
from .simclr import SimCLRConfig, SimCLRForPretraining
from .text_alignment import TextAlignmentConfig, TextAlignmentForPretraining
from .vgg import VGGConfig, VGGModel
from .vision_transformer import DinoVisionConfig, DinoVisionModel

AutoConfig.register(DinoVisionConfig.model_type, DinoVisionConfig, exist_ok=True)
AutoModel.register(DinoVisionConfig, DinoVisionModel, exist_ok=True)
AutoConfig.register(DinoPretrainingConfig.model_type, DinoPretrainingConfig, exist_ok=True)
AutoModel.register(DinoPretrainingConfig, DinoForPretraining, exist_ok=True)
AutoModelForPreTraining.register(DinoPretrainingConfig, DinoForPretraining, exist_ok=True)
for _config, _model in ((MoCoV3Config, MoCoV3ForPretraining), (BarlowTwinsConfig, BarlowTwinsForPretraining),
                        (DenseCLConfig, DenseCLForPretraining), (TextAlignmentConfig, TextAlignmentForPretraining),
                        (GroundingConfig, GroundingForPretraining),
                        (CopyDetectionConfig, CopyDetectionForPretraining), (SimCLRConfig, SimCLRForPretraining)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForPreTraining.register(_config, _model, exist_ok=True)

AutoConfig.register(DistillDinoConfig.model_type, DistillDinoConfig, exist_ok=True)
AutoModelForPreTraining.register(DistillDinoConfig, DistillDinoForPretraining, exist_ok=True)
AutoConfig.register(FeatureDistillConfig.model_type, FeatureDistillConfig, exist_ok=True)
AutoModelForPreTraining.register(FeatureDistillConfig, FeatureDistillForPretraining, exist_ok=True)

# Saved folders carry `auto_map`, so a Hub copy also loads with `trust_remote_code=True` without dinoforge.
DinoVisionConfig.register_for_auto_class()
DinoVisionModel.register_for_auto_class("AutoModel")
DinoPretrainingConfig.register_for_auto_class()
DinoForPretraining.register_for_auto_class("AutoModelForPreTraining")
AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig, exist_ok=True)
AutoModel.register(DualEncoderConfig, DualEncoderModel, exist_ok=True)
DualEncoderConfig.register_for_auto_class()
DualEncoderModel.register_for_auto_class("AutoModel")
AutoConfig.register(VGGConfig.model_type, VGGConfig, exist_ok=True)
AutoModel.register(VGGConfig, VGGModel, exist_ok=True)
VGGConfig.register_for_auto_class()
VGGModel.register_for_auto_class("AutoModel")

__all__ = [
    "BarlowTwinsConfig",
    "BarlowTwinsForPretraining",
    "CopyDetectionConfig",
    "CopyDetectionForPretraining",
    "DenseCLConfig",
    "DenseCLForPretraining",
    "DinoForPretraining",
    "DinoHead",
    "DinoPretrainingConfig",
    "DinoPretrainingOutput",
    "DinoVisionConfig",
    "DinoVisionModel",
    "DistillDinoConfig",
    "DistillDinoForPretraining",
    "DualEncoderConfig",
    "DualEncoderModel",
    "FeatureDistillConfig",
    "FeatureDistillForPretraining",
    "GroundingConfig",
    "GroundingForPretraining",
    "MoCoV3Config",
    "MoCoV3ForPretraining",
    "SimCLRConfig",
    "SimCLRForPretraining",
    "TextAlignmentConfig",
    "TextAlignmentForPretraining",
    "VGGConfig",
    "VGGModel",
    "convert",
    "losses",
]
