"""Export Deformable DETR to ONNX (portable or TensorRT plugin attention) and to
``torch.export`` programs, and run exported ONNX models (:class:`OnnxPredictor`).

See ``docs/deploy.md`` for the commands and what was verified.
"""
from .attention import (
    ATTENTION_MODES,
    TRT_PLUGIN_DOMAIN,
    TRT_PLUGIN_OP,
    ms_deform_attn_portable,
    use_attention,
)
from .exporter import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT_NAMES,
    OUTPUT_FILES,
    OUTPUT_NAMES,
    check_plugin_graph,
    dynamic_shapes,
    example_inputs,
    export_model,
    export_onnx,
    export_torch,
    load_torch_export,
    max_abs_diff,
    min_image_size,
    num_attention_calls,
    onnx_metadata,
    run_onnx,
    usage,
    verify_export,
)
from .onnx_predictor import OnnxPredictor, predictor_metadata
from .pipeline import export_from_config
from .wrapper import ExportableDeformableDETR, level_padding_masks, padding_mask_from_sizes

__all__ = [
    "ATTENTION_MODES",
    "DEFAULT_OPSET",
    "FORMATS",
    "INPUT_NAMES",
    "OUTPUT_FILES",
    "OUTPUT_NAMES",
    "TRT_PLUGIN_DOMAIN",
    "TRT_PLUGIN_OP",
    "ExportableDeformableDETR",
    "OnnxPredictor",
    "check_plugin_graph",
    "dynamic_shapes",
    "example_inputs",
    "export_from_config",
    "export_model",
    "export_onnx",
    "export_torch",
    "level_padding_masks",
    "load_torch_export",
    "max_abs_diff",
    "min_image_size",
    "ms_deform_attn_portable",
    "num_attention_calls",
    "onnx_metadata",
    "padding_mask_from_sizes",
    "predictor_metadata",
    "run_onnx",
    "usage",
    "use_attention",
    "verify_export",
]
