"""The released (official) Deformable DETR state dict and ours, in both directions.

Official names differ from ours in three places:

- backbone: torchvision ResNet names under ``backbone.0.body.`` -> detectron2 ResNet names
  under ``backbone.``: ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``,
  ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``, ``downsample.0``/``.1`` ->
  ``shortcut``/``shortcut.norm``;
- input projection: ``input_proj.*`` -> ``{INPUT_PROJ_PREFIX}*``;
- class heads: 91 rows indexed by COCO id -> 80 contiguous classes (see
  :mod:`.coco_classes`).

Everything under ``transformer.``, the heads and ``query_embed`` keep their names, including
the packed decoder self-attention (``in_proj_weight`` rows 0..C-1 q, C..2C-1 k, 2C..3C-1 v).
The released refinement / two-stage models store their heads twice (also as
``transformer.decoder.{bbox,class}_embed``) and the plain ones once per decoder layer; the
copies are checked to be equal, and the aliases are dropped: ours stores each head once per
layer, as the decoder gets the heads as forward arguments.
"""
from __future__ import annotations

import functools
import re
import string
from collections import defaultdict
from collections.abc import Iterable

import torch

from .coco_classes import class_rows, gather_class_rows, scatter_class_rows
from .safe_load import CheckpointError
from .variants import ModelHParams

__all__ = [
    "INPUT_PROJ_PREFIX",
    "detectron2_resnet_to_torchvision",
    "detectron2_to_official",
    "infer_official_hparams",
    "is_official_state_dict",
    "official_key_names",
    "official_to_detectron2",
    "torchvision_resnet_to_detectron2",
]

#: Where our meta-architecture keeps the input projection (``input_proj.{i}.{0,1}``).
INPUT_PROJ_PREFIX = "adapter.input_proj."

_OFFICIAL_BACKBONE = "backbone.0.body."
_D2_BACKBONE = "backbone."
_ENC_LAYER_KEYS = [
    f"{m}.{p}"
    for m in ["self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
              "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"]
    for p in ("weight", "bias")
]
_DEC_LAYER_KEYS = [
    f"{m}.{p}"
    for m in ["cross_attn.sampling_offsets", "cross_attn.attention_weights",
              "cross_attn.value_proj", "cross_attn.output_proj", "norm1"]
    for p in ("weight", "bias")
] + ["self_attn.in_proj_weight", "self_attn.in_proj_bias"] + [
    f"{m}.{p}"
    for m in ["self_attn.out_proj", "norm2", "linear1", "linear2", "norm3"]
    for p in ("weight", "bias")
]
_BN = ("weight", "bias", "running_mean", "running_var")
_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BASIC_RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


# --------------------------------------------------------------------------------------------
# Backbone names
# --------------------------------------------------------------------------------------------
# One table for both directions: (torchvision's name, detectron2's), with the {fields} that
# carry over. Stages count from 1 in torchvision ("layer1") and from 2 in detectron2 ("res2").
_RESNET_NAMES = (
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.{param}", "stem.conv1.norm.{param}"),
    ("layer{stage}.{block}.conv{i}.weight", "res{stage}.{block}.conv{i}.weight"),
    ("layer{stage}.{block}.bn{i}.{param}", "res{stage}.{block}.conv{i}.norm.{param}"),
    ("layer{stage}.{block}.downsample.0.weight", "res{stage}.{block}.shortcut.weight"),
    ("layer{stage}.{block}.downsample.1.{param}", "res{stage}.{block}.shortcut.norm.{param}"),
)
_NAME_FIELDS = {"stage": r"\d", "block": r"\d+", "i": r"\d", "param": r"\w+"}


@functools.cache  # each template compiled once
def _name_pattern(template: str) -> re.Pattern:
    return re.compile("".join(
        re.escape(literal) + (f"(?P<{field}>{_NAME_FIELDS[field]})" if field else "")
        for literal, field, _, _ in string.Formatter().parse(template)
    ))


def _rename_resnet(name: str, source: int, stage_shift: int) -> str:
    for names in _RESNET_NAMES:
        m = _name_pattern(names[source]).fullmatch(name)
        if m:
            fields = m.groupdict()
            if "stage" in fields:
                fields["stage"] = int(fields["stage"]) + stage_shift
            return names[1 - source].format(**fields)
    raise KeyError(name)


def torchvision_resnet_to_detectron2(name: str) -> str:
    """One torchvision ResNet parameter name (without prefix) -> detectron2's.

    Raises:
        KeyError: not a ResNet parameter name.
    """
    return _rename_resnet(name, 0, 1)


def detectron2_resnet_to_torchvision(name: str) -> str:
    """The inverse of :func:`torchvision_resnet_to_detectron2`."""
    return _rename_resnet(name, 1, -1)


# --------------------------------------------------------------------------------------------
# Layout of an official state dict
# --------------------------------------------------------------------------------------------
def is_official_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return "transformer.level_embed" in sd and any(k.startswith(_OFFICIAL_BACKBONE) for k in sd)


def _indices(sd: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def _backbone_blocks(sd: dict[str, torch.Tensor]) -> list[int]:
    blocks = [len(_indices(sd, f"{_OFFICIAL_BACKBONE}layer{i}.")) for i in range(1, 5)]
    if 0 in blocks:
        lacking = [f"layer{i + 1}" for i, n in enumerate(blocks) if not n]
        raise CheckpointError(f"the backbone lacks stage(s) {lacking} (expected a torchvision "
                              "ResNet with layer1..layer4)")
    return blocks


def _require(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"the checkpoint lacks {key!r}; it is not a complete Deformable "
                              "DETR state dict")
    return sd[key]


def _check_layers(found: list[int], expected: int, stack: str, why: str = "") -> None:
    missing = sorted(set(range(max(expected, found[-1] + 1))) - set(found))
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {stack} layer(s) {missing}: it has "
            f"transformer.{stack}.layers.{{{','.join(map(str, found))}}}{why}. The file is "
            "incomplete or was edited; use the released file"
        )


def infer_official_hparams(sd: dict[str, torch.Tensor], class_mapping: str = "coco"
                           ) -> ModelHParams:
    """Hyper-parameters read from an official state dict's names and shapes."""
    level_embed = _require(sd, "transformer.level_embed")
    blocks = tuple(_backbone_blocks(sd))
    bottleneck = f"{_OFFICIAL_BACKBONE}layer1.0.conv3.weight" in sd
    depth = (_RESNET_DEPTHS if bottleneck else _BASIC_RESNET_DEPTHS).get(blocks)
    if depth is None:
        raise CheckpointError(f"unsupported ResNet layout: {blocks} blocks per stage")
    two_stage = "transformer.enc_output.weight" in sd
    enc = _indices(sd, "transformer.encoder.layers.")
    dec = _indices(sd, "transformer.decoder.layers.")
    if not enc or not dec:
        raise CheckpointError("the checkpoint has no encoder or no decoder layers; it is not "
                              "a complete Deformable DETR checkpoint: use the released file")
    # One class head per decoder layer (plus the encoder's in two-stage models): a file
    # that lost a layer would otherwise be reported as having too many heads.
    num_heads = len(_indices(sd, "class_embed."))
    _check_layers(enc, len(enc), "encoder")
    _check_layers(dec, max(len(dec), num_heads - int(two_stage)), "decoder",
                  f" ({num_heads} class heads, one per decoder layer"
                  f"{' plus the encoder head' if two_stage else ''})")
    num_rows = _require(sd, "class_embed.0.weight").shape[0]
    width = sd[f"{_OFFICIAL_BACKBONE}layer1.0.conv1.weight"].shape[0]
    return ModelHParams(
        hidden_dim=level_embed.shape[1],
        num_feature_levels=level_embed.shape[0],
        enc_layers=len(enc),
        dec_layers=len(dec),
        dim_feedforward=_require(sd, "transformer.encoder.layers.0.linear1.weight").shape[0],
        num_queries=None if two_stage else _require(sd, "query_embed.weight").shape[0],
        num_classes=len(class_rows(class_mapping, num_rows)),
        with_box_refine=two_stage or "transformer.decoder.bbox_embed.0.layers.0.weight" in sd,
        two_stage=two_stage,
        enc_heads_points=_require(
            sd, "transformer.encoder.layers.0.self_attn.attention_weights.weight").shape[0],
        dec_heads_points=_require(
            sd, "transformer.decoder.layers.0.cross_attn.attention_weights.weight").shape[0],
        resnet_depth=depth,
        stem_out_channels=_require(sd, f"{_OFFICIAL_BACKBONE}conv1.weight").shape[0],
        res2_out_channels=sd[f"{_OFFICIAL_BACKBONE}layer1.0.conv{3 if bottleneck else 2}.weight"]
        .shape[0],
        width_per_group=width if bottleneck else 64,
    )


def official_key_names(hp: ModelHParams, backbone_blocks: Iterable[int],
                       bottleneck: bool = True) -> list[str]:
    """Every key of an official state dict with these hyper-parameters, in released order."""
    keys = ["transformer.level_embed"]
    for i in range(hp.enc_layers):
        keys += [f"transformer.encoder.layers.{i}.{k}" for k in _ENC_LAYER_KEYS]
    for i in range(hp.dec_layers):
        keys += [f"transformer.decoder.layers.{i}.{k}" for k in _DEC_LAYER_KEYS]
    num_pred = hp.dec_layers + int(hp.two_stage)
    box = [f"layers.{j}.{p}" for j in range(3) for p in ("weight", "bias")]
    if hp.with_box_refine:
        keys += [f"transformer.decoder.bbox_embed.{i}.{k}" for i in range(num_pred) for k in box]
    if hp.two_stage:
        keys += [f"transformer.decoder.class_embed.{i}.{p}" for i in range(num_pred)
                 for p in ("weight", "bias")]
        keys += [f"transformer.{m}.{p}" for m in ("enc_output", "enc_output_norm", "pos_trans",
                                                 "pos_trans_norm") for p in ("weight", "bias")]
    else:
        keys += ["transformer.reference_points.weight", "transformer.reference_points.bias"]
    keys += [f"class_embed.{i}.{p}" for i in range(num_pred) for p in ("weight", "bias")]
    keys += [f"bbox_embed.{i}.{k}" for i in range(num_pred) for k in box]
    if not hp.two_stage:
        keys.append("query_embed.weight")
    keys += [f"input_proj.{lvl}.{j}.{p}" for lvl in range(hp.num_feature_levels)
             for j in (0, 1) for p in ("weight", "bias")]
    keys += [f"{_OFFICIAL_BACKBONE}conv1.weight"] + [f"{_OFFICIAL_BACKBONE}bn1.{p}" for p in _BN]
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for stage, n in enumerate(backbone_blocks, start=1):
        for b in range(n):
            pre = f"{_OFFICIAL_BACKBONE}layer{stage}.{b}."
            for c in convs:
                keys += [f"{pre}conv{c}.weight"] + [f"{pre}bn{c}.{p}" for p in _BN]
            if b == 0:
                keys += [f"{pre}downsample.0.weight"] + [f"{pre}downsample.1.{p}" for p in _BN]
    return keys


def _check_keys(sd: dict[str, torch.Tensor], hp: ModelHParams) -> None:
    blocks = _backbone_blocks(sd)
    bottleneck = f"{_OFFICIAL_BACKBONE}layer1.0.conv3.weight" in sd
    expected = set(official_key_names(hp, blocks, bottleneck))
    present = {k for k in sd if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        raise CheckpointError(
            "the state dict does not have the layout of a Deformable DETR checkpoint with "
            f"{hp.enc_layers} encoder / {hp.dec_layers} decoder layers, "
            f"{hp.num_feature_levels} levels, box refinement={hp.with_box_refine}, "
            f"two-stage={hp.two_stage}: " + "; ".join(parts)
        )


def _head_groups(sd: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    groups: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    for k, v in sd.items():
        m = pat.fullmatch(k)
        if m:
            groups[int(m.group(1))][m.group(2)] = v
    return groups


def _check_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    for k, v in a.items():
        if v.shape != b[k].shape or not torch.equal(v, b[k]):
            raise CheckpointError(f"{what} differ at {k!r}; in a released checkpoint they are "
                                  "the same tensors")


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------
def official_to_detectron2(sd: dict[str, torch.Tensor], class_mapping: str = "coco",
                           hp: ModelHParams | None = None) -> dict[str, torch.Tensor]:
    """Official state dict -> ours.

    Args:
        sd: the ``"model"`` entry of a released checkpoint (or an equivalent).
        class_mapping: "coco" (91 COCO-id rows -> 80 classes) or "identity".
        hp: hyper-parameters, inferred from ``sd`` when None.

    Raises:
        CheckpointError: missing or unexpected keys, or aliased heads that differ.
    """
    hp = hp or infer_official_hparams(sd, class_mapping)
    _check_keys(sd, hp)
    num_pred = hp.dec_layers + int(hp.two_stage)
    # Consistency of heads stored more than once (they are one module in the released model).
    cls, box = _head_groups(sd, "class_embed."), _head_groups(sd, "bbox_embed.")
    if not hp.with_box_refine:
        for i in range(1, num_pred):
            _check_same(cls[0], cls[i], f"the shared class heads class_embed.0 and .{i}")
            _check_same(box[0], box[i], f"the shared box heads bbox_embed.0 and .{i}")
    for alias, heads, present in (("transformer.decoder.bbox_embed.", box, hp.with_box_refine),
                                  ("transformer.decoder.class_embed.", cls, hp.two_stage)):
        if present:
            for i, group in _head_groups(sd, alias).items():
                _check_same(heads[i], group, f"{alias}{i} and its head")

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith(_OFFICIAL_BACKBONE):
            try:
                name = torchvision_resnet_to_detectron2(k[len(_OFFICIAL_BACKBONE):])
            except KeyError:
                raise CheckpointError(f"unknown backbone parameter {k!r}") from None
            out[_D2_BACKBONE + name] = v
            continue
        if k.startswith("input_proj."):
            out[INPUT_PROJ_PREFIX + k[len("input_proj."):]] = v
            continue
        m = re.fullmatch(r"(transformer\.decoder\.)?class_embed\.(\d+)\.(weight|bias)", k)
        if m:
            if m.group(1):  # an alias of the head (see the module docstring)
                continue
            encoder_head = hp.two_stage and int(m.group(2)) == hp.dec_layers
            v = gather_class_rows(v, class_rows(class_mapping, v.shape[0], encoder_head))
        elif k.startswith("transformer.decoder.bbox_embed."):
            continue
        out[k] = v
    return out


def detectron2_to_official(sd: dict[str, torch.Tensor], class_mapping: str = "coco",
                           num_official_classes: int = 91,
                           with_box_refine: bool | None = None) -> dict[str, torch.Tensor]:
    """Ours -> official (the inverse of :func:`official_to_detectron2`).

    Class rows that no class maps to get a zero weight and the prior bias. Keys outside the
    model (e.g. ``pixel_mean``) are dropped.

    Args:
        sd: our model's state dict.
        class_mapping: "coco" (80 classes -> 91 COCO-id rows) or "identity".
        num_official_classes: rows of the released heads for the "coco" mapping.
        with_box_refine: whether the heads are per-layer (refinement); by default, whether
            ``bbox_embed.0`` and ``.1`` are different tensors (shared heads are one module,
            so a model's state dict holds the same tensor for every layer).
    """
    two_stage = "transformer.enc_output.weight" in sd
    dec_layers = len(_indices(sd, "transformer.decoder.layers."))
    if with_box_refine is None:
        with_box_refine = two_stage or any(
            k.startswith("transformer.decoder.bbox_embed.") for k in sd
        ) or ("bbox_embed.1.layers.0.weight" in sd and sd["bbox_embed.1.layers.0.weight"]
              .data_ptr() != sd["bbox_embed.0.layers.0.weight"].data_ptr())
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_D2_BACKBONE):
            out[_OFFICIAL_BACKBONE + detectron2_resnet_to_torchvision(k[len(_D2_BACKBONE):])] = v
        elif k.startswith(INPUT_PROJ_PREFIX):
            out["input_proj." + k[len(INPUT_PROJ_PREFIX):]] = v
        elif re.match(r"(transformer\.|class_embed\.|bbox_embed\.|query_embed\.)", k):
            m = re.fullmatch(r"(transformer\.decoder\.)?class_embed\.(\d+)\.(weight|bias)", k)
            if m:
                encoder_head = two_stage and int(m.group(2)) == dec_layers
                n = num_official_classes if class_mapping == "coco" else v.shape[0]
                v = scatter_class_rows(v, class_rows(class_mapping, n, encoder_head), n)
            out[k] = v
    # The released model registers the refinement heads under the decoder too.
    for name, present in (("bbox_embed", with_box_refine), ("class_embed", two_stage)):
        if present:
            for k in [k for k in out if k.startswith(name + ".")]:
                out["transformer.decoder." + k] = out[k]
    return out
