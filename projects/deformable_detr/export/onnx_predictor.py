"""Run an exported ONNX model with onnxruntime and return detectron2 ``Instances``."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances

from ..data.dataset_mapper import DetrResizeShortestEdge
from ..engine.predictor import BatchPredictor
from ..modeling import topk_detections
from .exporter import INPUT_NAMES, OUTPUT_NAMES, onnx_metadata

__all__ = ["OnnxPredictor", "predictor_metadata"]

# Metadata keys and the config entries they come from.
_FROM_CFG = {
    "input_format": ("INPUT", "FORMAT"),
    "min_size_test": ("INPUT", "MIN_SIZE_TEST"),
    "max_size_test": ("INPUT", "MAX_SIZE_TEST"),
    "detections_per_image": ("TEST", "DETECTIONS_PER_IMAGE"),
}


def predictor_metadata(cfg: CfgNode) -> dict[str, Any]:
    """What a predictor needs besides the graph, from the config: the input channel order,
    the test-time resize and the number of detections (stored by the exporters)."""
    meta = {key: cfg[a][b] for key, (a, b) in _FROM_CFG.items()}
    meta["num_classes"] = cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES
    meta["config"] = cfg.dump()
    return meta


class OnnxPredictor(BatchPredictor):
    """:class:`~deformable_detr.engine.predictor.Predictor` for an ONNX file written by
    ``tools/export_model.py --format onnx`` (portable attention), run by onnxruntime.

    The same resize, batching and post-processing as ``Predictor``, so both return the same
    ``Instances`` (up to float rounding). Each batch is padded at the bottom and right with
    zeros to its largest image, and the image sizes go in with it.

    Args:
        path: the .onnx file.
        cfg: the config to take ``INPUT.FORMAT``, ``INPUT.MIN/MAX_SIZE_TEST`` and
            ``TEST.DETECTIONS_PER_IMAGE`` from; default: the values the exporter stored in
            the file.
        providers: onnxruntime execution providers (default: the CPU).
        num_threads: onnxruntime's intra-op threads (default: onnxruntime's choice).
        max_batch_size, pad_batches: see :class:`BatchPredictor`.
    """

    def __init__(self, path: str, *, cfg: CfgNode | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 num_threads: int | None = None, max_batch_size: int = 8,
                 pad_batches: bool = False):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path}")
        meta = onnx_metadata(path)
        if meta.get("attention") == "plugin":
            raise ValueError(f"{path} was exported with --attention plugin: its attention nodes "
                             "are TensorRT plugins, which only TensorRT runs; export with "
                             "--attention portable for onnxruntime")
        if cfg is not None:
            meta.update({key: cfg[a][b] for key, (a, b) in _FROM_CFG.items()})
        missing = [key for key in _FROM_CFG if key not in meta]
        if missing:
            raise ValueError(f"{path} does not say its {', '.join(missing)} (not written by "
                             "tools/export_model.py?): pass cfg=")
        super().__init__(
            augmentations=[DetrResizeShortestEdge(meta["min_size_test"], meta["max_size_test"],
                                                  "choice")],
            input_format=meta["input_format"], max_batch_size=max_batch_size,
            pad_batches=pad_batches)
        self.metadata = meta
        self.detections_per_image = int(meta["detections_per_image"])
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(path, sess_options=options,
                                            providers=list(providers))
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ValueError(f"{path} has inputs {names}, expected {list(INPUT_NAMES)}")

    def raw_outputs(self, images: np.ndarray, image_sizes: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's outputs: pred_logits [N, Q, C] and pred_boxes [N, Q, 4] for a padded
        uint8 batch [N, 3, H, W] and its int64 sizes [N, 2]."""
        logits, boxes = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAMES[0]: images, INPUT_NAMES[1]: image_sizes})
        return torch.from_numpy(logits), torch.from_numpy(boxes)

    def predict_batch(self, inputs: list[dict]) -> list[Instances]:
        sizes = [tuple(x["image"].shape[-2:]) for x in inputs]
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        batch = np.zeros((len(inputs), 3, height, width), dtype=np.uint8)
        for i, x in enumerate(inputs):
            h, w = sizes[i]
            batch[i, :, :h, :w] = x["image"].numpy()
        logits, boxes = self.raw_outputs(batch, np.asarray(sizes, dtype=np.int64))
        results = topk_detections(logits, boxes, sizes, self.detections_per_image)
        return [detector_postprocess(r, x["height"], x["width"])
                for r, x in zip(results, inputs)]
