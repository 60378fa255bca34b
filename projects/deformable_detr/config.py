"""Config keys of Deformable DETR, added to a detectron2 (yacs) config, and their checks."""
from __future__ import annotations

from collections.abc import Mapping

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec

from .layers.ms_deform_attn import check_attention_arguments
from .modeling.criterion import check_one_to_many_arguments
from .modeling.deformable_transformer import check_transformer_arguments
from .modeling.heads import check_class_count
from .modeling.multiscale_adapter import check_adapter_arguments

__all__ = ["add_deformable_detr_config", "validate_config"]


def add_deformable_detr_config(cfg: CN) -> CN:
    """Add the ``MODEL.DEFORMABLE_DETR`` and solver keys with the published defaults."""
    cfg.MODEL.DEFORMABLE_DETR = CN()
    c = cfg.MODEL.DEFORMABLE_DETR
    c.NUM_CLASSES = 80
    c.IN_FEATURES = ["res3", "res4", "res5"]
    c.NUM_FEATURE_LEVELS = 4
    c.HIDDEN_DIM = 256
    c.NHEADS = 8
    c.ENC_LAYERS = 6
    c.DEC_LAYERS = 6
    c.DIM_FEEDFORWARD = 1024
    c.DROPOUT = 0.1
    c.ENC_N_POINTS = 4
    c.DEC_N_POINTS = 4
    c.NUM_QUERIES = 300
    c.WITH_BOX_REFINE = False
    c.TWO_STAGE = False
    c.AUX_LOSS = True
    c.CLS_WEIGHT = 2.0
    c.BBOX_WEIGHT = 5.0
    c.GIOU_WEIGHT = 2.0
    c.COST_CLASS = 2.0
    c.COST_BBOX = 5.0
    c.COST_GIOU = 2.0
    c.FOCAL_ALPHA = 0.25
    # Training only: match the first ONE_TO_MANY_LAYERS decoder layers against every target
    # repeated ONE_TO_MANY_K times (H-DETR's hybrid layer scheme: faster convergence; the
    # last layers stay one-to-one, so inference is unchanged). 0: the published training.
    c.ONE_TO_MANY_LAYERS = 0
    c.ONE_TO_MANY_K = 2
    # "auto": the compiled op where the extension has a kernel for the device, else PyTorch;
    # "compiled": the compiled op or an error at build time; "pytorch": grid_sample path.
    c.ATTN_IMPL = "auto"
    # Run the backbone in channels-last memory layout (oneDNN's preferred layout for CPU
    # convolutions and a vectorised max-pool, and tensor cores' for half precision on CUDA;
    # the same numbers up to float rounding).
    c.BACKBONE_CHANNELS_LAST = True
    # MODEL.WEIGHTS whose classes differ from the model's (those of DATASETS.TRAIN[0], else
    # DATASETS.TEST[0]) in number or names, e.g. COCO weights for another dataset: "by_name"
    # copies the class-head rows of the classes named alike (case-insensitive) and starts
    # the others from the prior; "reinit" starts every class from the prior.
    c.CLASS_HEAD_INIT = "by_name"

    # Optimizer: AdamW with three parameter groups (base lr; backbone lr x BACKBONE_MULTIPLIER;
    # sampling_offsets / reference_points lr x LINEAR_PROJ_MULTIPLIER) and gradient clipping
    # by the global norm over the whole model (detectron2's SOLVER.CLIP_GRADIENTS clips
    # each parameter on its own).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["sampling_offsets", "reference_points"]
    cfg.SOLVER.FULL_MODEL_CLIP_NORM = 0.1  # <= 0 disables

    # The published augmentation's crop branch: resize the short side to one of these, crop
    # a random (h, w) in [CROP_SIZE_MIN, CROP_SIZE_MAX], then the usual multi-scale resize.
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = True
    cfg.INPUT.DETR_CROP.RESIZE_SHORT = [400, 500, 600]
    cfg.INPUT.DETR_CROP.CROP_SIZE_MIN = 384
    cfg.INPUT.DETR_CROP.CROP_SIZE_MAX = 600

    # Training annotations whose box is unusable (zero or negative width/height, NaN or
    # infinite coordinates, far outside the image; see DeformableDetrDatasetMapper):
    # "drop" reports them once per image with the image id and drops them, "error" stops.
    cfg.INPUT.INVALID_ANNOTATIONS = "drop"

    # An exponential moving average of the weights (engine.model_ema.ModelEMA): decay
    # DECAY * (1 - exp(-updates / WARMUP_ITERS)) per iteration; evaluations and
    # model_final.pth use the average. Off in the published recipe.
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.999
    cfg.MODEL_EMA.WARMUP_ITERS = 0
    return cfg


def validate_config(cfg: CN, backbone_shape: Mapping[str, ShapeSpec] | None = None) -> None:
    """Raise a ValueError naming the key of the first ``MODEL.DEFORMABLE_DETR`` value the
    model cannot be built with.

    The modules' checks of their own arguments run here under the keys' names, so that the
    error names what the user wrote.

    Args:
        backbone_shape: the backbone's ``output_shape()``; without it ``IN_FEATURES`` is not
            checked against the backbone's outputs.
    """
    c = cfg.MODEL.DEFORMABLE_DETR
    key = "MODEL.DEFORMABLE_DETR."
    for name in ("NUM_QUERIES", "HIDDEN_DIM", "NHEADS", "ENC_LAYERS", "DEC_LAYERS",
                 "DIM_FEEDFORWARD", "ENC_N_POINTS", "DEC_N_POINTS", "NUM_FEATURE_LEVELS"):
        if int(c[name]) < 1:
            raise ValueError(f"{key}{name} must be at least 1, got {c[name]}")
    check_class_count(c.NUM_CLASSES, f"{key}NUM_CLASSES")
    check_attention_arguments(c.HIDDEN_DIM, c.NHEADS, c.ATTN_IMPL, names={
        "d_model": f"{key}HIDDEN_DIM", "n_heads": f"{key}NHEADS", "attn_impl": f"{key}ATTN_IMPL",
    })
    check_transformer_arguments(c.HIDDEN_DIM, c.WITH_BOX_REFINE, c.TWO_STAGE, names={
        "d_model": f"{key}HIDDEN_DIM", "with_box_refine": f"{key}WITH_BOX_REFINE",
        "two_stage": f"{key}TWO_STAGE",
    })
    check_one_to_many_arguments(c.ONE_TO_MANY_LAYERS, c.ONE_TO_MANY_K, c.DEC_LAYERS, names={
        "layers": f"{key}ONE_TO_MANY_LAYERS", "k": f"{key}ONE_TO_MANY_K",
        "num_decoder_layers": f"{key}DEC_LAYERS",
    })
    if c.ONE_TO_MANY_LAYERS and not c.AUX_LOSS:
        raise ValueError(f"{key}ONE_TO_MANY_LAYERS needs {key}AUX_LOSS: True (it is a loss "
                         "on the auxiliary decoder outputs)")
    check_adapter_arguments(
        c.IN_FEATURES, c.HIDDEN_DIM, c.NUM_FEATURE_LEVELS, backbone_shape,
        names={"in_features": f"{key}IN_FEATURES", "hidden_dim": f"{key}HIDDEN_DIM",
               "num_levels": f"{key}NUM_FEATURE_LEVELS"},
        backbone_name=cfg.MODEL.BACKBONE.NAME,
    )
