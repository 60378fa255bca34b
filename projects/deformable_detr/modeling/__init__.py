"""The Deformable DETR model: importing this registers ``DeformableDETR`` in detectron2's
``META_ARCH_REGISTRY`` (and ``build_torchvision_resnet_backbone`` and the demo's
``build_slim_resnet_backbone`` in ``BACKBONE_REGISTRY``)."""
from .backbone import build_torchvision_resnet_backbone
from .box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
    refine_boxes,
)
from .criterion import SetCriterion, sigmoid_focal_loss
from .deformable_decoder import DeformableTransformerDecoder, DeformableTransformerDecoderLayer
from .deformable_encoder import (
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    encoder_reference_points,
)
from .deformable_transformer import DeformableTransformer
from .grids import get_valid_ratio
from .heads import MLP, build_prediction_heads
from .lazy import build_deformable_detr
from .matcher import HungarianMatcher
from .meta_arch import DeformableDETR
from .multiscale_adapter import MultiScaleAdapter
from .position_encoding import PositionEmbeddingSine, sine_embedding
from .postprocess import topk_detections
from .slim_resnet import build_slim_resnet_backbone
from .two_stage import gen_encoder_output_proposals, proposal_pos_embed

__all__ = [
    "MLP",
    "DeformableDETR",
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "HungarianMatcher",
    "MultiScaleAdapter",
    "PositionEmbeddingSine",
    "SetCriterion",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "build_deformable_detr",
    "build_prediction_heads",
    "build_slim_resnet_backbone",
    "build_torchvision_resnet_backbone",
    "encoder_reference_points",
    "gen_encoder_output_proposals",
    "generalized_box_iou",
    "get_valid_ratio",
    "inverse_sigmoid",
    "paired_generalized_box_iou",
    "proposal_pos_embed",
    "refine_boxes",
    "sigmoid_focal_loss",
    "sine_embedding",
    "topk_detections",
]
