"""Reading and writing checkpoints safely (:class:`SafeDetectionCheckpointer`: no pickled
code runs, atomic saves, verified resume) and converting released Deformable DETR weights
(official and Hugging Face) to detectron2."""
from .atomic_io import atomic_torch_save, atomic_write_text
from .checkpointer import (
    ALLOWED_MISSING,
    SafeDetectionCheckpointer,
    class_head_options,
    dataset_class_names,
    load_inference_weights,
    read_checkpoint,
)
from .class_heads import (
    CLASS_HEAD_INITS,
    ClassHeadReport,
    adapt_class_heads,
    add_class_names,
    prior_bias,
)
from .coco_classes import coco_class_names, coco_contiguous_ids
from .convert import (
    FORMATS,
    ConversionResult,
    convert_checkpoint,
    convert_state_dict,
    load_source,
    save_detectron2_checkpoint,
)
from .huggingface import huggingface_to_official
from .official import (
    detectron2_to_official,
    infer_official_hparams,
    official_key_names,
    official_to_detectron2,
)
from .safe_load import (
    CheckpointError,
    load_pickle_weights,
    load_safetensors_file,
    load_torch_file,
)
from .variants import VARIANTS, ModelHParams, Variant, select_variant

__all__ = [
    "ALLOWED_MISSING",
    "CLASS_HEAD_INITS",
    "FORMATS",
    "VARIANTS",
    "CheckpointError",
    "SafeDetectionCheckpointer",
    "ClassHeadReport",
    "ConversionResult",
    "adapt_class_heads",
    "add_class_names",
    "atomic_torch_save",
    "atomic_write_text",
    "class_head_options",
    "ModelHParams",
    "Variant",
    "coco_class_names",
    "coco_contiguous_ids",
    "convert_checkpoint",
    "convert_state_dict",
    "dataset_class_names",
    "detectron2_to_official",
    "huggingface_to_official",
    "infer_official_hparams",
    "load_inference_weights",
    "load_pickle_weights",
    "load_safetensors_file",
    "load_source",
    "load_torch_file",
    "official_key_names",
    "official_to_detectron2",
    "prior_bias",
    "read_checkpoint",
    "save_detectron2_checkpoint",
    "select_variant",
]
