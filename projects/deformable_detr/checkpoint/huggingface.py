"""Hugging Face ``transformers`` Deformable DETR checkpoints -> the official layout.

``DeformableDetrForObjectDetection`` checkpoints (a directory with ``config.json`` and
``model.safetensors`` / ``pytorch_model.bin``, or one weights file) are renamed to the
official names, after which :mod:`.official` maps them to ours. Both the transformers 4.x
names (as saved on the Hub, and still written by ``save_pretrained``) and the 5.x in-memory
names are read:

==========================================  ==============================================
Hugging Face                                official
==========================================  ==============================================
model.backbone[.conv_encoder].model.*       backbone.0.body.* (timm names = torchvision's;
                                            HF ResNet names are renamed, see below)
model.input_proj.*                          input_proj.*
model.query_position_embeddings.weight      query_embed.weight
model.level_embed / reference_points /      transformer.*
enc_output[_norm] / pos_trans[_norm]
model.encoder.layers.i.self_attn.*          transformer.encoder.layers.i.self_attn.*
  self_attn_layer_norm / final_layer_norm     norm1 / norm2
  [mlp.]fc1 / [mlp.]fc2                       linear1 / linear2
model.decoder.layers.i.encoder_attn.*       transformer.decoder.layers.i.cross_attn.*
  self_attn.{q,k,v}_proj                      self_attn.in_proj_{weight,bias} (q, k, v rows)
  self_attn.{out,o}_proj                      self_attn.out_proj
  self_attn_layer_norm / encoder_attn_l.n.    norm2 / norm1
  final_layer_norm                            norm3
model.decoder.{class,bbox}_embed.*          transformer.decoder.{class,bbox}_embed.*
{class,bbox}_embed.*                        {class,bbox}_embed.*
==========================================  ==============================================

Tied heads that ``save_pretrained`` stores once are restored: ``class_embed.i`` /
``bbox_embed.i`` from ``model.decoder.*`` (refinement, two-stage) or from index 0 (heads
shared across layers).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from .safe_load import CheckpointError, file_kind, load_safetensors_file, load_torch_file

__all__ = [
    "huggingface_config_hints",
    "huggingface_to_official",
    "is_huggingface_state_dict",
    "load_huggingface",
    "read_config",
]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_BACKBONE_PREFIX = re.compile(r"model\.backbone\.(?:conv_encoder\.)?model\.")
_ENC_RENAMES = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2",
                "fc1": "linear1", "fc2": "linear2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
_DEC_RENAMES = {"self_attn_layer_norm": "norm2", "encoder_attn_layer_norm": "norm1",
                "final_layer_norm": "norm3", "fc1": "linear1", "fc2": "linear2",
                "mlp.fc1": "linear1", "mlp.fc2": "linear2", "encoder_attn": "cross_attn",
                "self_attn.o_proj": "self_attn.out_proj"}


def is_huggingface_state_dict(sd: dict[str, Any]) -> bool:
    return any(k.startswith(("model.encoder.layers.", "model.input_proj.", "model.level_embed"))
               for k in sd)


def load_huggingface(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Weights (and ``config.json`` when found) of a ``transformers`` checkpoint.

    Args:
        path: a directory holding ``config.json`` and ``model.safetensors`` (or
            ``pytorch_model.bin``, or a sharded ``*.index.json``), or a weights file (its
            directory's ``config.json`` is read when present).

    Returns:
        (state_dict, config dict or None).
    """
    if os.path.isdir(path):
        directory = path
        files = [os.path.join(path, f) for f in _WEIGHT_FILES
                 if os.path.exists(os.path.join(path, f))]
        index = [os.path.join(path, f + ".index.json") for f in _WEIGHT_FILES
                 if os.path.exists(os.path.join(path, f + ".index.json"))]
        if not files and not index:
            raise CheckpointError(
                f"{path} holds no Hugging Face weights (expected one of {list(_WEIGHT_FILES)} "
                "or a sharded *.index.json)"
            )
        sd = _load_weights(files[0]) if files else _load_sharded(index[0])
    else:
        directory = os.path.dirname(os.path.abspath(path))
        sd = _load_sharded(path) if path.endswith(".index.json") else _load_weights(path)
    return sd, read_config(directory)


def read_config(directory: str) -> dict | None:
    """``config.json`` of a Hugging Face checkpoint directory, or None if there is none."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        return None
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    if config.get("model_type", "deformable_detr") != "deformable_detr":
        raise CheckpointError(f"{config_path} describes a {config.get('model_type')!r} "
                              "model, not deformable_detr")
    return config


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors") or file_kind(path) == "safetensors":
        return load_safetensors_file(path)
    sd = load_torch_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return sd


def _load_sharded(index_path: str) -> dict[str, torch.Tensor]:
    try:
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index ({e})") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(_load_weights(os.path.join(os.path.dirname(index_path), shard)))
    return sd


def _hf_resnet_to_torchvision(name: str) -> str:
    """HF ``ResNetBackbone`` names -> torchvision's (timm names are torchvision's already)."""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", name)
    if m:
        return ("conv1." if m.group(1) == "convolution" else "bn1.") + m.group(2)
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", name)
    if not m:
        return name
    pre, rest = f"layer{int(m.group(1)) + 1}.{m.group(2)}.", m.group(3)
    m = re.fullmatch(r"shortcut\.(convolution|normalization)\.(\w+)", rest)
    if m:
        return pre + ("downsample.0." if m.group(1) == "convolution" else "downsample.1.") + \
            m.group(2)
    m = re.fullmatch(r"layer\.(\d)\.(convolution|normalization)\.(\w+)", rest)
    if m:
        k = int(m.group(1)) + 1
        return pre + (f"conv{k}." if m.group(2) == "convolution" else f"bn{k}.") + m.group(3)
    return pre + rest


def _rename_layer(rest: str, renames: dict[str, str]) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return renames[old] + rest[len(old):]
    return rest


def huggingface_to_official(sd: dict[str, torch.Tensor], config: dict | None = None
                            ) -> dict[str, torch.Tensor]:
    """Rename a ``DeformableDetrForObjectDetection`` state dict to the official layout.

    Args:
        sd: its state dict (4.x or 5.x names).
        config: its ``config.json`` contents, if known (says whether the heads are refined).

    Raises:
        CheckpointError: keys that belong to no known module, or an incomplete q/k/v triple.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = _BACKBONE_PREFIX.match(k)
        if m:
            out["backbone.0.body." + _hf_resnet_to_torchvision(k[m.end():])] = v
            continue
        m = re.fullmatch(r"model\.encoder\.layers\.(\d+)\.(.+)", k)
        if m:
            out[f"transformer.encoder.layers.{m.group(1)}."
                + _rename_layer(m.group(2), _ENC_RENAMES)] = v
            continue
        m = re.fullmatch(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
                         k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        m = re.fullmatch(r"model\.decoder\.layers\.(\d+)\.(.+)", k)
        if m:
            out[f"transformer.decoder.layers.{m.group(1)}."
                + _rename_layer(m.group(2), _DEC_RENAMES)] = v
            continue
        m = re.fullmatch(r"model\.decoder\.((?:class|bbox)_embed\..+)", k)
        if m:
            out["transformer.decoder." + m.group(1)] = v
            continue
        m = re.fullmatch(r"model\.(level_embed|reference_points\..+|enc_output\..+|"
                         r"enc_output_norm\..+|pos_trans\..+|pos_trans_norm\..+)", k)
        if m:
            out["transformer." + m.group(1)] = v
            continue
        if k == "model.query_position_embeddings.weight":
            out["query_embed.weight"] = v
        elif k.startswith("model.input_proj."):
            out[k[len("model."):]] = v
        elif k.startswith(("class_embed.", "bbox_embed.")):
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) of no known Deformable DETR module, e.g. "
                              f"{unknown[:5]}")
    for (layer, p), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"decoder layer {layer} self-attention lacks "
                                  f"{sorted({'q', 'k', 'v'} - set(parts))}_proj.{p}")
        # nn.MultiheadAttention packs q, k, v along the output dimension, in that order.
        out[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{p}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], 0)
    config = config or {}
    _restore_tied_heads(out, config.get("with_box_refine"), config.get("two_stage"))
    return out


def _restore_tied_heads(sd: dict[str, torch.Tensor], with_box_refine: bool | None = None,
                        two_stage: bool | None = None) -> None:
    """Add the head copies that tied weights leave out of a saved file.

    ``save_pretrained`` stores a tied tensor once: refinement / two-stage heads under
    ``model.decoder.*`` only, and heads shared across decoder layers as index 0 only.
    """
    two_stage = "transformer.enc_output.weight" in sd if two_stage is None else two_stage
    if with_box_refine is None:
        with_box_refine = two_stage or any(k.startswith("transformer.decoder.bbox_embed.")
                                           for k in sd)
    dec_layers = len({k.split(".")[3] for k in sd if k.startswith("transformer.decoder.layers.")})
    num_pred = dec_layers + int(two_stage)

    def copy(src: str, dst: str) -> None:
        for k in [k for k in sd if k.startswith(src)]:
            sd[dst + k[len(src):]] = sd[k]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    for name in ("class_embed", "bbox_embed"):
        alias = f"transformer.decoder.{name}."
        for i in range(num_pred):
            if not has(f"{name}.{i}."):
                copy(f"{alias}{i}." if has(f"{alias}{i}.") else f"{name}.0.", f"{name}.{i}.")
        if (name == "bbox_embed" and with_box_refine) or (name == "class_embed" and two_stage):
            for i in range(num_pred):
                if not has(f"{alias}{i}."):
                    copy(f"{name}.{i}.", f"{alias}{i}.")


def huggingface_config_hints(config: dict | None) -> dict[str, Any]:
    """What ``config.json`` adds to the weights: DC5 dilation, heads, points, proposals.

    Raises:
        CheckpointError: settings our model does not implement.
    """
    if not config:
        return {}
    problems = []
    if config.get("position_embedding_type", "sine") != "sine":
        problems.append(f"position_embedding_type={config['position_embedding_type']!r} "
                        "(only 'sine')")
    if config.get("activation_function", "relu") != "relu":
        problems.append(f"activation_function={config['activation_function']!r} (only 'relu')")
    if config.get("encoder_attention_heads", 8) != config.get("decoder_attention_heads", 8):
        problems.append("different encoder and decoder head counts")
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type") == "resnet":
        if backbone.get("downsample_in_bottleneck"):
            problems.append("backbone downsample_in_bottleneck=True (stride on the 1x1 conv)")
        if backbone.get("downsample_in_first_stage"):
            problems.append("backbone downsample_in_first_stage=True")
    name = backbone.get("backbone") or config.get("backbone")
    if name and not re.fullmatch(r"resnet(18|34|50|101|152)", str(name)):
        problems.append(f"backbone {name!r} (only torchvision-style ResNets)")
    if problems:
        raise CheckpointError("the Hugging Face config uses settings this model does not "
                              "implement: " + "; ".join(problems))
    hints: dict[str, Any] = {
        "dilation": bool(config.get("dilation", False)
                         or backbone.get("output_stride") == 16),
        "nheads": config.get("encoder_attention_heads", 8),
        "enc_n_points": config.get("encoder_n_points", 4),
        "dec_n_points": config.get("decoder_n_points", 4),
    }
    if config.get("two_stage"):
        hints["num_queries"] = config.get("two_stage_num_proposals", 300)
    return hints
