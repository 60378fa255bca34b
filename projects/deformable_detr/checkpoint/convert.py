"""Convert released Deformable DETR weights (official or Hugging Face) to a detectron2 file.

Example::

    from deformable_detr.checkpoint import convert_checkpoint, save_detectron2_checkpoint

    result = convert_checkpoint("r50_deformable_detr-checkpoint.pth")
    print(result.summary())  # the variant and the config to use
    save_detectron2_checkpoint(result, "deformable_detr_r50.pth")

    # then: MODEL.WEIGHTS deformable_detr_r50.pth (the file records COCO's 80 class names,
    # so fine-tuning on another dataset copies the rows of the classes it shares with COCO)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import torch

from .atomic_io import atomic_torch_save
from .coco_classes import NUM_COCO_ID_CLASSES, coco_class_names
from .huggingface import (
    huggingface_config_hints,
    huggingface_to_official,
    is_huggingface_state_dict,
    load_huggingface,
    read_config,
)
from .official import infer_official_hparams, is_official_state_dict, official_to_detectron2
from .safe_load import CheckpointError, file_kind, load_torch_file
from .variants import Variant, select_variant

__all__ = [
    "FORMATS",
    "ConversionResult",
    "convert_checkpoint",
    "convert_state_dict",
    "load_source",
    "save_detectron2_checkpoint",
]

FORMATS = ("auto", "official", "huggingface")
CLASS_MAPPINGS = ("auto", "coco", "identity")

#: Printed with every conversion of an official checkpoint.
OFFSET_NOTE = (
    "checkpoints released before 2020-12-07 normalised sampling offsets by (H, W) instead of "
    "(W, H); this model (like the current releases) uses (W, H), so such old files give "
    "lower accuracy: use the current release"
)


@dataclasses.dataclass
class ConversionResult:
    """A converted state dict and what is needed to use it."""

    #: Parameters named as in our model (``DetectionCheckpointer`` loads them).
    state_dict: dict[str, torch.Tensor]
    #: "official" or "huggingface".
    source_format: str
    variant: Variant
    #: Flat ``[KEY, VALUE, ...]`` config overrides the weights need beyond the config file.
    config_overrides: list[str]
    #: "coco" (91 COCO-id rows -> 80 classes) or "identity".
    class_mapping: str
    notes: list[str]
    #: One name per class-head row, written as the checkpoint's "thing_classes": COCO's 80
    #: for the "coco" mapping, a Hugging Face config's ``id2label`` for "identity"; None
    #: when the source does not say.
    class_names: Optional[list[str]] = None

    @property
    def config_file(self) -> str:
        return self.variant.config_file

    def summary(self, weights: str = "converted.pth") -> str:
        """A human-readable report ending with the evaluation command."""
        lines = [
            f"source format: {self.source_format}",
            f"variant:       {self.variant.name}",
            f"classes:       {self.class_mapping} mapping, "
            + (f"{len(self.class_names)} class names recorded" if self.class_names else
               "no class names recorded (fine-tuning re-initialises mismatched class heads)"),
            f"config:        {self.config_file}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        opts = " ".join(self.config_overrides)
        lines.append(
            "evaluate with: python train_net.py --eval-only --config-file "
            f"{self.config_file} MODEL.WEIGHTS {weights}" + (f" {opts}" if opts else "")
        )
        return "\n".join(lines)


def load_source(path: str, format: str = "auto") -> tuple[str, dict[str, torch.Tensor], dict]:
    """Read a checkpoint safely and tell its format.

    Args:
        path: an official ``.pth``, a Hugging Face directory, or a Hugging Face weights file
            (``.bin`` / ``.safetensors``).
        format: "auto", "official" or "huggingface".

    Returns:
        (format, state dict in the file's own names, hints): hints hold what the file
        records besides tensors (``dilation``, ``nheads``, ``num_queries``, ...).

    Raises:
        CheckpointError: unreadable, unsafe, or unrelated files, or a format mismatch.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if (os.path.isdir(path) or path.endswith((".safetensors", ".index.json"))
            or file_kind(path) == "safetensors"):
        if format == "official":
            raise CheckpointError(f"{path} is a Hugging Face checkpoint, not an official one")
        sd, config = load_huggingface(path)
        return "huggingface", sd, huggingface_config_hints(config) | {"hf_config": config}

    obj = load_torch_file(path)
    hints: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
        args = obj.get("args")
        if args is not None:
            # The training arguments record what the tensors do not (DC5, heads, points).
            a = vars(args) if hasattr(args, "__dict__") else dict(args)
            for key, name in (("dilation", "dilation"), ("nheads", "nheads"),
                              ("enc_n_points", "enc_n_points"), ("dec_n_points", "dec_n_points"),
                              ("num_queries", "num_queries")):
                if key in a:
                    hints[name] = a[key]
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: the state dict holds non-tensor entries")
    if "dilation" not in hints and "dc5" in os.path.basename(path).lower():
        hints["dilation"] = True  # the released file name says so

    if is_official_state_dict(sd):
        detected = "official"
    elif is_huggingface_state_dict(sd):
        detected = "huggingface"
        config = read_config(os.path.dirname(os.path.abspath(path)))
        hints = huggingface_config_hints(config) | {"hf_config": config}
    elif any(k.startswith(("backbone.stem.", "backbone.res")) for k in sd) and any(
            k.startswith("transformer.") for k in sd):
        raise CheckpointError(f"{path} is already in this project's detectron2 format; "
                              "load it directly with MODEL.WEIGHTS")
    else:
        raise CheckpointError(
            f"{path} is not a Deformable DETR checkpoint: its {len(sd)} keys (e.g. "
            f"{list(sd)[:3]}) have neither the official names (transformer.*, "
            "backbone.0.body.*) nor the Hugging Face ones (model.encoder.*)"
        )
    if format != "auto" and format != detected:
        raise CheckpointError(f"{path} looks like a(n) {detected} checkpoint, not {format}")
    return detected, sd, hints


def convert_state_dict(sd: dict[str, torch.Tensor], source_format: str,
                       hints: dict | None = None, class_mapping: str = "auto",
                       variant: str | None = None) -> ConversionResult:
    """Convert an in-memory state dict (see :func:`convert_checkpoint`)."""
    hints = dict(hints or {})
    if class_mapping not in CLASS_MAPPINGS:
        raise ValueError(f"class_mapping must be one of {CLASS_MAPPINGS}, got {class_mapping!r}")
    notes = []
    if source_format == "huggingface":
        sd = huggingface_to_official(sd, hints.get("hf_config"))
    elif source_format != "official":
        raise ValueError(f"unknown source format {source_format!r}")
    if class_mapping == "auto":
        rows = sd["class_embed.0.weight"].shape[0] if "class_embed.0.weight" in sd else None
        class_mapping = "coco" if rows == NUM_COCO_ID_CLASSES else "identity"
        if class_mapping == "identity" and rows is not None:
            notes.append(f"{rows}-way class heads are kept as they are (not COCO's 91 ids)")
    hp = infer_official_hparams(sd, class_mapping)
    for key in ("dilation", "nheads", "enc_n_points", "dec_n_points"):
        if hints.get(key) is not None:
            setattr(hp, key, hints[key])
    if hp.two_stage and hints.get("num_queries") is not None:
        hp.num_queries = int(hints["num_queries"])
    try:
        chosen, overrides, variant_notes = select_variant(hp, variant)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    out = official_to_detectron2(sd, class_mapping, hp)
    if source_format == "official":
        variant_notes.append(OFFSET_NOTE)
    if class_mapping == "coco":
        names: Optional[list[str]] = list(coco_class_names())
    else:
        names = _id2label_names(hints.get("hf_config"), hp.num_classes)
    return ConversionResult(out, source_format, chosen, overrides, class_mapping,
                            notes + variant_notes, names)


def _id2label_names(config: Optional[dict], num_classes: int) -> Optional[list[str]]:
    """A Hugging Face config's ``id2label`` as one name per row, if it names every row."""
    id2label = (config or {}).get("id2label")
    if not isinstance(id2label, dict):
        return None
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    if sorted(labels) != list(range(num_classes)):
        return None
    return [labels[i] for i in range(num_classes)]


def convert_checkpoint(path: str, format: str = "auto", class_mapping: str = "auto",
                       variant: str | None = None) -> ConversionResult:
    """Convert a released checkpoint to our parameter names.

    Args:
        path: an official checkpoint (``{"model": state_dict, ...}``, any of the five
            released variants), a Hugging Face ``DeformableDetrForObjectDetection`` directory
            (``config.json`` + weights) or weights file (``.bin`` / ``.safetensors``).
        format: "auto", "official" or "huggingface".
        class_mapping: "coco" maps 91-way COCO-id class heads to detectron2's 80 contiguous
            classes, "identity" keeps the rows, "auto" picks "coco" for 91-row heads.
        variant: force a variant name (see :data:`VARIANTS`), e.g. "single_scale_dc5"
            when the file does not record the dilation.

    Raises:
        CheckpointError: unreadable, unsafe, unrelated or incomplete checkpoints.
    """
    source_format, sd, hints = load_source(path, format)
    return convert_state_dict(sd, source_format, hints, class_mapping, variant)


def save_detectron2_checkpoint(result: ConversionResult, path: str) -> None:
    """Write ``{"model": state_dict, "thing_classes": names, ...}`` for ``MODEL.WEIGHTS``,
    through a temporary file renamed into place (an interrupted write leaves no partial
    file)."""
    atomic_torch_save(
        {
            "model": {k: v.contiguous() for k, v in result.state_dict.items()},
            "__author__": f"deformable_detr.checkpoint ({result.source_format} "
                          f"{result.variant.name})",
            # Names already match the model exactly; no fuzzy matching on load.
            "matching_heuristics": False,
            # Fine-tuning on another dataset copies the rows of the classes named alike.
            **({"thing_classes": list(result.class_names)} if result.class_names else {}),
        },
        path,
    )
