"""Export a Deformable DETR model to ONNX or to a ``torch.export`` program.

Both formats hold :class:`~.wrapper.ExportableDeformableDETR`: inputs ``images`` uint8
[N, 3, H, W] (a batch padded at the bottom and right, channels in ``INPUT.FORMAT``) and
``image_sizes`` int64 [N, 2] (unpadded height, width); outputs ``pred_logits`` [N, Q, C] and
``pred_boxes`` [N, Q, 4] (normalised cx, cy, w, h), i.e. ``model.raw_outputs`` of the
unpadded images. N, H and W are dynamic; H and W must exceed the coarsest level's stride
(:func:`min_image_size`), because a level one pixel high or wide would be specialised by the
tracer.

- ``onnx`` with ``attention="portable"``: standard ONNX operators only, the sampling as
  gathers (no ``GridSample``); runs in onnxruntime.
- ``onnx`` with ``attention="plugin"``: each attention call is one
  ``MultiscaleDeformableAttnPlugin_TRT`` node for TensorRT (which provides its kernel; other
  runtimes cannot run the model).
- ``torch_export``: an ``ExportedProgram`` saved with ``torch.export.save``, keeping the
  custom op ``deformable_detr::ms_deform_attn_forward`` (compiled CPU and CUDA kernels).
  ``torch.export.load`` needs ``import deformable_detr`` first, which registers the op.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..layers import MSDeformAttn, has_compiled_op, ms_deform_attn
from .attention import (
    ATTENTION_MODES,
    TRT_PLUGIN_OP,
    ms_deform_attn_portable,
    trt_plugin_translation,
    use_attention,
)
from .wrapper import ExportableDeformableDETR

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "INPUT_NAMES",
    "METADATA_KEY",
    "OUTPUT_FILES",
    "OUTPUT_NAMES",
    "check_plugin_graph",
    "dynamic_shapes",
    "example_inputs",
    "export_model",
    "export_onnx",
    "export_torch",
    "load_torch_export",
    "max_abs_diff",
    "min_image_size",
    "num_attention_calls",
    "onnx_metadata",
    "run_onnx",
    "usage",
    "verify_export",
]

#: Export formats and the file each writes in the output folder.
FORMATS = ("onnx", "torch_export")
OUTPUT_FILES = {"onnx": "model.onnx", "torch_export": "model.pt2"}
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
#: The opset the ONNX exporter builds (torchlib's); others are converted from it.
DEFAULT_OPSET = 18
#: Key of the JSON metadata in the ONNX file (``metadata_props``) and in the .pt2 archive
#: (``extra_files``): what a predictor needs besides the graph (input format, resize, k).
METADATA_KEY = "deformable_detr"
_PT2_EXTRA = METADATA_KEY + ".json"


def _check_exportable(model) -> ExportableDeformableDETR:
    wrapper = ExportableDeformableDETR(model)
    if model.training:
        raise ValueError("export needs the model in eval mode (call model.eval()): training "
                         "mode runs dropout and returns losses")
    return wrapper.eval()


def min_image_size(model) -> int:
    """The smallest padded height and width the exported graph takes: one more than the
    coarsest level's stride, so that every level is at least 2 pixels high and wide."""
    strides = [s for s in model.adapter.strides if s]
    return (max(strides) if strides else 32) + 1


def example_inputs(model, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two random images of different sizes, on the model's device, big
    enough for every level to have at least 3 pixels (so that no size is specialised).

    Returns:
        images uint8 [2, 3, H, W] and image_sizes int64 [2, 2].
    """
    stride = min_image_size(model) - 1
    height, width = 3 * stride + 8, 4 * stride + 24
    sizes = [(height, width - stride // 2), (height - stride // 2, width)]
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, height, width), generator=g, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):  # padding holds zeros, as a predictor writes it
        images[i, :, h:] = 0
        images[i, :, :, w:] = 0
    return images.to(model.device), torch.tensor(sizes, device=model.device)


def dynamic_shapes(model) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export``: N, H and W dynamic (H, W from
    :func:`min_image_size`)."""
    from torch.export import Dim

    lo = min_image_size(model)
    batch = Dim("batch", min=1)
    return {"images": {0: batch, 2: Dim("height", min=lo), 3: Dim("width", min=lo)},
            "image_sizes": {0: batch}}


def _compiled_attention(model, what: str):
    """Every MSDeformAttn calls the compiled op while tracing (whatever ``ATTN_IMPL``)."""
    device = model.device
    if not has_compiled_op(device):
        raise RuntimeError(f"{what} keeps the compiled op deformable_detr::"
                           f"ms_deform_attn_forward, which has no {device.type} kernel in this "
                           "build: rebuild the extension (`pip install -e .`, FORCE_CUDA=1 for "
                           "CUDA) or export on the CPU")
    return use_attention(model, ms_deform_attn)


def export_torch(model, path: str | None = None, *,
                 metadata: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    """Export to an ``ExportedProgram`` (and save it to ``path`` if given).

    The attention stays the custom op ``deformable_detr::ms_deform_attn_forward``, so the
    program runs the compiled kernels of the device it is run on. It is traced on the
    model's device; move a loaded program with
    ``torch.export.passes.move_to_device_pass(program, "cuda")``.

    Args:
        model: a DeformableDETR in eval mode.
        metadata: stored in the archive as ``deformable_detr.json`` (see
            :func:`onnx_metadata`).
    """
    wrapper = _check_exportable(model)
    with torch.no_grad(), _compiled_attention(model, "torch_export"):
        program = torch.export.export(wrapper, example_inputs(model),
                                      dynamic_shapes=dynamic_shapes(model))
    if path is not None:
        extra = {_PT2_EXTRA: json.dumps(metadata or {})}
        torch.export.save(program, path, extra_files=extra)
    return program


def load_torch_export(path: str) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """``torch.export.load`` of a file written by :func:`export_torch`, with its metadata.
    Importing this package has registered the custom op the program calls."""
    extra = {_PT2_EXTRA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program, json.loads(extra[_PT2_EXTRA] or "{}")


def export_onnx(model, path: str, *, attention: str = "portable", opset: int = DEFAULT_OPSET,
                metadata: dict[str, Any] | None = None) -> str:
    """Export to ONNX with the dynamo exporter and save to ``path`` (one file, weights
    included).

    Args:
        model: a DeformableDETR in eval mode.
        attention: "portable" (standard operators, gathers; runs in onnxruntime) or "plugin"
            (one TensorRT ``MultiscaleDeformableAttnPlugin_TRT`` node per attention call).
        opset: the ONNX opset (the exporter builds opset 18 and converts).
        metadata: stored as JSON in ``metadata_props["deformable_detr"]``.

    Returns:
        ``path``.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    wrapper = _check_exportable(model)
    if attention == "portable":
        context, table = use_attention(model, ms_deform_attn_portable), None
    else:
        context, table = _compiled_attention(model, "--attention plugin"), trt_plugin_translation()
    with torch.no_grad(), context:
        program = torch.onnx.export(
            wrapper, example_inputs(model), dynamo=True, dynamic_shapes=dynamic_shapes(model),
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            opset_version=opset, custom_translation_table=table, external_data=False,
            optimize=True, verbose=False,
        )
    meta = dict(metadata or {}, attention=attention)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    program.save(path, external_data=False)
    return path


def onnx_metadata(path: str) -> dict[str, Any]:
    """The JSON metadata :func:`export_onnx` stored in an ONNX file ({} if none)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def run_onnx(session_or_path, images, image_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an exported ONNX model with onnxruntime.

    Args:
        session_or_path: an ``onnxruntime.InferenceSession`` or a path (a CPU session).
        images: uint8 [N, 3, H, W]; image_sizes: int64 [N, 2] (tensors or arrays).

    Returns:
        pred_logits [N, Q, C] and pred_boxes [N, Q, 4] as CPU tensors.
    """
    session = session_or_path
    if isinstance(session_or_path, (str, os.PathLike)):
        import onnxruntime as ort

        session = ort.InferenceSession(os.fspath(session_or_path),
                                       providers=["CPUExecutionProvider"])
    feeds = {name: (x.cpu().numpy() if isinstance(x, torch.Tensor) else x)
             for name, x in zip(INPUT_NAMES, (images, image_sizes))}
    logits, boxes = session.run(list(OUTPUT_NAMES), feeds)
    return torch.from_numpy(logits), torch.from_numpy(boxes)


def check_plugin_graph(path: str, num_attention: int | None = None) -> list[dict[str, Any]]:
    """Check the structure of a ``--attention plugin`` ONNX file, TensorRT's contract.

    Checked: no ``GridSample``; every ``MultiscaleDeformableAttnPlugin_TRT`` node has the
    plugin's five inputs with ranks 4, 2, 1, 6, 5, int32 index inputs, one rank-4 output
    (with ``num_attention``: that many nodes). Ranks and types come from ONNX shape
    inference.

    Returns:
        per plugin node, its inputs' and output's (element type, shape) as ONNX infers them.

    Raises:
        ValueError naming what differs.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    graph = model.graph
    infos = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}

    def describe(name):
        info = infos.get(name)
        if info is None or not info.type.HasField("tensor_type"):
            return None, None
        t = info.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim] if t.HasField("shape") else None
        return onnx.TensorProto.DataType.Name(t.elem_type), dims

    grid = [n.name for n in graph.node if n.op_type == "GridSample"]
    if grid:
        raise ValueError(f"GridSample nodes in {path}: {grid}")
    nodes = [n for n in graph.node if n.op_type == TRT_PLUGIN_OP]
    if num_attention is not None and len(nodes) != num_attention:
        raise ValueError(f"{path} has {len(nodes)} {TRT_PLUGIN_OP} nodes, expected "
                         f"{num_attention} (one per attention call)")
    ranks = (4, 2, 1, 6, 5)
    found = []
    for node in nodes:
        if len(node.input) != 5 or len(node.output) != 1:
            raise ValueError(f"{node.name}: {len(node.input)} inputs and {len(node.output)} "
                             "outputs, the plugin takes 5 and gives 1")
        ins = [describe(x) for x in node.input]
        out = describe(node.output[0])
        for i, ((dtype, dims), rank) in enumerate(zip(ins, ranks)):
            if dims is not None and len(dims) != rank:
                raise ValueError(f"{node.name}: input {i} has rank {len(dims)}, the plugin "
                                 f"expects {rank}")
            if i in (1, 2) and dtype not in (None, "INT32"):
                raise ValueError(f"{node.name}: input {i} is {dtype}, the plugin takes INT32")
        found.append({"name": node.name, "domain": node.domain, "inputs": ins, "output": out})
    return found


def export_model(model, output_dir: str, *, format: str, attention: str = "portable",
                 opset: int = DEFAULT_OPSET, metadata: dict[str, Any] | None = None) -> str:
    """Export ``model`` to ``output_dir/model.onnx`` or ``output_dir/model.pt2``.

    Returns:
        the path written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, OUTPUT_FILES[format])
    if format == "onnx":
        return export_onnx(model, path, attention=attention, opset=opset, metadata=metadata)
    export_torch(model, path, metadata=metadata)
    return path


def num_attention_calls(model) -> int:
    """How many attention calls one forward makes (one per MSDeformAttn module)."""
    return sum(isinstance(m, MSDeformAttn) for m in model.modules())


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over pairs of tensors (compared on the CPU)."""
    return max(float((x.detach().cpu().float() - y.detach().cpu().float()).abs().max())
               for x, y in zip(a, b))


def verify_export(path: str, model, *, format: str, attention: str = "portable"
                  ) -> dict[str, Any]:
    """Check an exported file against ``model.raw_outputs`` on a padded batch of two images
    of different sizes (:func:`example_inputs`).

    ``onnx`` portable runs onnxruntime on the CPU, ``torch_export`` loads the file with
    ``torch.export.load``; both report the largest difference of ``pred_logits`` and
    ``pred_boxes``. ``onnx`` plugin cannot run outside TensorRT: its structure is checked
    (:func:`check_plugin_graph`).

    Returns:
        dict with "check" (what was done) and "max_abs_diff" (None for the plugin graph).
    """
    images, sizes = example_inputs(model, seed=1)
    inputs = [{"image": images[i, :, :h, :w]} for i, (h, w) in enumerate(sizes.tolist())]
    if format == "onnx" and attention == "plugin":
        nodes = check_plugin_graph(path, num_attention_calls(model))
        return {"check": f"{len(nodes)} {TRT_PLUGIN_OP} nodes (one per attention call) with "
                         "the plugin's five inputs, no GridSample", "max_abs_diff": None}
    with torch.no_grad():
        ref = model.raw_outputs(inputs)
        if format == "onnx":
            got = run_onnx(path, images, sizes)
            how = "onnxruntime (CPU)"
        else:
            program, _ = load_torch_export(path)
            got = program.module()(images, sizes)
            how = "torch.export.load"
    diff = max_abs_diff(got, (ref["pred_logits"], ref["pred_boxes"]))
    shape = "x".join(str(s) for s in images.shape)
    return {"check": f"{how} on a padded batch {shape} of two images "
                     f"({', '.join(f'{h}x{w}' for h, w in sizes.tolist())}) vs "
                     "model.raw_outputs", "max_abs_diff": diff}


def usage(path: str, *, format: str, attention: str = "portable", min_size: int = 65) -> str:
    """How to run an exported file (for the tool's output); ``min_size`` is
    :func:`min_image_size`."""
    if format == "torch_export":
        return (f"import torch, deformable_detr  # the import registers the custom op\n"
                f"program = torch.export.load({path!r})\n"
                "pred_logits, pred_boxes = program.module()(images, image_sizes)\n"
                "# on a GPU: torch.export.passes.move_to_device_pass(program, 'cuda') first")
    if attention == "plugin":
        return (f"trtexec --onnx={path} \\\n"
                f"    --minShapes=images:1x3x{min_size}x{min_size},image_sizes:1x2 \\\n"
                "    --optShapes=images:1x3x800x1333,image_sizes:1x2 \\\n"
                "    --maxShapes=images:4x3x1344x1344,image_sizes:4x2\n"
                f"# {TRT_PLUGIN_OP} comes with TensorRT (libnvinfer_plugin)")
    return ("import onnxruntime\n"
            f"session = onnxruntime.InferenceSession({path!r})\n"
            "pred_logits, pred_boxes = session.run(None, {'images': images, "
            "'image_sizes': image_sizes})\n"
            "# or detections as Instances:\n"
            "from deformable_detr.export import OnnxPredictor\n"
            f"instances = OnnxPredictor({path!r})([image])  # [H, W, 3] uint8 arrays")
