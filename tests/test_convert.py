"""Official-format conversion, without the original code: key lists of the five released
checkpoints, exact round trips through official-format files built from our own model, and
refusal of truncated, corrupt, unrelated and malicious files.

The key lists (names and shapes of every tensor of each released checkpoint) are copies of
the reference lists, in ``tests/data/official_checkpoint_keys/``.
"""
from __future__ import annotations

import argparse
import ast
import functools
import math
import os
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import (
    VARIANTS,
    CheckpointError,
    convert_checkpoint,
    convert_state_dict,
    detectron2_to_official,
    infer_official_hparams,
    official_key_names,
    save_detectron2_checkpoint,
)
from deformable_detr.checkpoint.official import (
    detectron2_resnet_to_torchvision,
    torchvision_resnet_to_detectron2,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_DIR = os.path.join(REPO, "tests", "data", "official_checkpoint_keys")
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


# ------------------------------------------------------------------ independent references
def read_key_list(name: str) -> dict[str, tuple]:
    """{key: shape} of a released checkpoint, in file order."""
    out = {}
    with open(os.path.join(KEY_DIR, f"{name}.txt")) as f:
        for line in f.read().splitlines():
            key, shape = line.split("\t")
            out[key] = tuple(ast.literal_eval(shape))
    return out


def d2_tool_name(k: str) -> str:
    """detectron2's tools/convert-torchvision-to-d2.py renaming, as written there."""
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    return k.replace("downsample.1", "shortcut.norm")


def coco_ids() -> list[int]:
    """The 80 COCO ids in detectron2's contiguous order, from its metadata."""
    m = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    return [cid for cid, _ in sorted(m.items(), key=lambda kv: kv[1])]


def synthetic_official(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A released-layout state dict with random values (a new dict of shared tensors; do not
    modify them in place); copies that are one tensor in the released model (shared heads,
    decoder aliases) are equal."""
    return dict(_synthetic_official(variant, seed))


@functools.lru_cache(maxsize=None)
def _synthetic_official(variant: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.rand(s, generator=g) + 0.5
          for k, s in read_key_list(VARIANTS[variant].official_name).items()}
    for k in sd:
        if k.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            sd[k] = sd[k[len("transformer.decoder."):]]
        if not VARIANTS[variant].with_box_refine and k.startswith(("class_embed.", "bbox_embed.")):
            head, _, rest = k.split(".", 2)
            sd[k] = sd[f"{head}.0.{rest}"]
    return sd


@functools.lru_cache(maxsize=None)
def cached_r50(variant: str):
    """One 80-class model per variant, shared by tests that overwrite all of its tensors."""
    return build_r50(variant)


def build_r50(variant: str, num_classes: int = 80):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, VARIANTS[variant].config_file))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = num_classes
    return build_model(cfg).eval()


def randomize_(model, seed: int = 0) -> None:
    """Random values in every tensor (shared heads stay one tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def model_keys(model) -> set[str]:
    return set(model.state_dict()) - {"pixel_mean", "pixel_std"}


def save_official(sd, path, **args) -> None:
    """Write a file like the released ones: model, optimizer, lr_scheduler, epoch, args."""
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                "lr_scheduler": {"step_size": 40, "last_epoch": 50}, "epoch": 49,
                "args": argparse.Namespace(lr=2e-4, nheads=8, enc_n_points=4, dec_n_points=4,
                                           num_queries=300, **args)}, path)


# ------------------------------------------------------------------------------- names
def test_backbone_names_follow_detectron2s_torchvision_conversion():
    keys = [k[len("backbone.0.body."):] for k in read_key_list("plain")
            if k.startswith("backbone.0.body.")]
    assert len(keys) == 265
    for k in keys:
        assert torchvision_resnet_to_detectron2(k) == d2_tool_name(k)
        assert detectron2_resnet_to_torchvision(d2_tool_name(k)) == k
    with pytest.raises(KeyError):
        torchvision_resnet_to_detectron2("fc.weight")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_key_lists_match_our_model(variant):
    """Our R-50 with 91 classes, mapped to the official names, has exactly the released
    keys and shapes; the converter's own key generator lists them in the released order."""
    released = read_key_list(VARIANTS[variant].official_name)
    official = detectron2_to_official(build_r50(variant, 91).state_dict(), "identity")
    assert {k: tuple(v.shape) for k, v in official.items()} == released
    hp = infer_official_hparams({k: torch.empty(s) for k, s in released.items()})
    blocks = [3, 4, 6, 3]
    assert official_key_names(hp, blocks) == list(released)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_layout_converts_and_loads(variant, tmp_path):
    """Every tensor of a released-layout file lands in our 80-class model, by detectron2's
    backbone names and COCO's id -> contiguous class map."""
    sd = synthetic_official(variant)
    path = str(tmp_path / VARIANTS[variant].checkpoint_file)
    save_official(sd, path, dilation=variant.endswith("dc5"),
                  with_box_refine=VARIANTS[variant].with_box_refine,
                  two_stage=VARIANTS[variant].two_stage)
    result = convert_checkpoint(path)
    assert (result.source_format, result.variant.name) == ("official", variant)
    assert result.config_file == VARIANTS[variant].config_file
    assert result.config_overrides == [] and result.class_mapping == "coco"
    assert any("2020-12-07" in n for n in result.notes)

    model = cached_r50(variant)
    assert set(result.state_dict) == model_keys(model)
    out = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(result, out)
    DetectionCheckpointer(model).load(out)
    ours = model.state_dict()

    ids = coco_ids()
    dec_layers = 6
    for k, v in sd.items():
        if k.startswith("backbone.0.body."):
            assert torch.equal(ours["backbone." + d2_tool_name(k[16:])], v), k
        elif k.startswith("input_proj."):
            assert torch.equal(ours["adapter." + k], v), k
        elif k.startswith("class_embed.") or k.startswith("transformer.decoder.class_embed."):
            i = int(k.split(".")[-2])
            base = k[len("transformer.decoder."):] if k.startswith("transformer.") else k
            rows = [0] + ids[1:] if (VARIANTS[variant].two_stage and i == dec_layers) else ids
            assert torch.equal(ours[base], v[rows]), k
        elif k.startswith("transformer.decoder.bbox_embed."):
            assert torch.equal(ours[k[len("transformer.decoder."):]], v), k
        else:
            assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_through_an_official_file_is_exact(variant, tmp_path):
    model = cached_r50(variant)
    randomize_(model)
    ours = {k: v for k, v in model.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
    official = detectron2_to_official(ours)
    assert set(official) == set(read_key_list(VARIANTS[variant].official_name))

    # Class rows: class i is COCO id ids[i]; unused ids get the prior; the two-stage encoder
    # head keeps its proposal channel 0 at row 0.
    ids = coco_ids()
    w, b = official["class_embed.0.weight"], official["class_embed.0.bias"]
    assert torch.equal(w[1], ours["class_embed.0.weight"][0])  # person
    assert torch.equal(w[90], ours["class_embed.0.weight"][79])  # toothbrush
    for unused in sorted(set(range(91)) - set(ids)):
        assert (w[unused] == 0).all() and b[unused].item() == pytest.approx(PRIOR_BIAS)
    if VARIANTS[variant].two_stage:
        assert torch.equal(official["class_embed.6.weight"][0], ours["class_embed.6.weight"][0])
        assert torch.equal(official["transformer.decoder.class_embed.3.bias"],
                           official["class_embed.3.bias"])

    path = str(tmp_path / "official.pth")
    save_official(official, path, dilation=variant.endswith("dc5"))
    result = convert_checkpoint(path)
    assert result.variant.name == variant
    assert set(result.state_dict) == set(ours)
    for k, v in ours.items():
        assert torch.equal(result.state_dict[k], v), k


# ------------------------------------------------------------------- variant detection
def test_dc5_is_recognised_from_args_file_name_or_flag(tmp_path):
    sd = synthetic_official("single_scale")
    path = str(tmp_path / "model.pth")
    torch.save({"model": sd}, path)
    result = convert_checkpoint(path)
    assert result.variant.name == "single_scale"
    assert any("single_scale_dc5" in n for n in result.notes)  # says how to pick DC5
    assert convert_checkpoint(path, variant="single_scale_dc5").variant.name == \
        "single_scale_dc5"
    save_official(sd, path, dilation=True)
    assert convert_checkpoint(path).variant.name == "single_scale_dc5"
    dc5_name = str(tmp_path / "r50_deformable_detr_single_scale_dc5-checkpoint.pth")
    torch.save({"model": sd}, dc5_name)
    assert convert_checkpoint(dc5_name).variant.name == "single_scale_dc5"
    with pytest.raises(CheckpointError, match="does not match"):
        convert_checkpoint(path, variant="two_stage")


def test_non_released_sizes_get_config_overrides():
    sd = synthetic_official("plain")
    sd["query_embed.weight"] = sd["query_embed.weight"][:100]
    for k in [k for k in sd if k.startswith("class_embed.")]:
        sd[k] = sd[k][:20]
    result = convert_state_dict(sd, "official")
    assert result.class_mapping == "identity"
    assert result.config_overrides == ["MODEL.DEFORMABLE_DETR.NUM_QUERIES", "100",
                                       "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "20"]
    assert "MODEL.DEFORMABLE_DETR.NUM_QUERIES 100" in result.summary()
    with pytest.raises(ValueError, match="91-way"):
        convert_state_dict(sd, "official", class_mapping="coco")


def test_hub_layout_equals_official(tmp_path):
    """A Hugging Face Hub checkpoint (transformers 4.x names, timm = torchvision backbone
    names, q/k/v separate, every head stored) converts like the official file it came from."""
    official = synthetic_official("two_stage", seed=3)
    hub = {}
    for k, v in official.items():
        if k.startswith("backbone.0.body."):
            hub["model.backbone.conv_encoder.model." + k[16:]] = v
        elif k.startswith("transformer.encoder.layers."):
            for a, b in (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"),
                         ("linear1", "fc1"), ("linear2", "fc2")):
                k = k.replace(f".{a}.", f".{b}.")
            hub["model." + k[len("transformer."):]] = v
        elif k.startswith("transformer.decoder.layers."):
            k = "model." + k[len("transformer."):]
            if "self_attn.in_proj_" in k:
                p = k.rsplit("_", 1)[-1]
                for j, name in enumerate("qkv"):
                    hub[k.replace(f"in_proj_{p}", f"{name}_proj.{p}")] = v.chunk(3)[j]
                continue
            for a, b in (("norm1", "encoder_attn_layer_norm"), ("norm2", "self_attn_layer_norm"),
                         ("norm3", "final_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2"),
                         ("cross_attn", "encoder_attn")):
                k = k.replace(f".{a}.", f".{b}.")
            hub[k] = v
        elif k.startswith("transformer."):
            hub["model." + k[len("transformer."):]] = v
        elif k.startswith("input_proj."):
            hub["model." + k] = v
        elif k == "query_embed.weight":
            hub["model.query_position_embeddings.weight"] = v
        else:
            hub[k] = v
    path = str(tmp_path / "pytorch_model.bin")
    torch.save(hub, path)
    from_hub = convert_checkpoint(path)
    assert from_hub.source_format == "huggingface" and from_hub.variant.name == "two_stage"
    direct = convert_state_dict(official, "official").state_dict
    assert set(from_hub.state_dict) == set(direct)
    for k, v in direct.items():
        assert torch.equal(from_hub.state_dict[k], v), k


# ----------------------------------------------------------------------- bad input files
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("good") / "plain.pth")
    save_official(synthetic_official("plain"), path)
    return path


def test_truncated_files_are_refused(good_file, tmp_path):
    data = open(good_file, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_checkpoint(str(truncated))
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"transformer.level_embed": torch.rand(4, 256)}}, legacy,
               _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(str(legacy))


def test_corrupt_random_empty_and_missing_files_are_refused(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(1 << 16))
    # A first byte that starts neither a zip, a pickle nor a safetensors header.
    noise.write_bytes(b"\x00" + noise.read_bytes()[1:])
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        convert_checkpoint(str(noise))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        convert_checkpoint(str(empty))
    with pytest.raises(CheckpointError, match="not found"):
        convert_checkpoint(str(tmp_path / "nothing.pth"))
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1" + os.urandom(64))
    with pytest.raises(CheckpointError, match="safetensors"):
        convert_checkpoint(str(corrupt))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no Hugging Face weights"):
        convert_checkpoint(str(tmp_path / "hf"))


def test_unrelated_incomplete_and_inconsistent_state_dicts_are_refused(tmp_path, good_file):
    path = str(tmp_path / "x.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a Deformable DETR checkpoint"):
        convert_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        convert_checkpoint(path)

    sd = synthetic_official("box_refine")
    incomplete = dict(sd)
    del incomplete["transformer.decoder.layers.3.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.3\.norm2\.weight"):
        convert_state_dict(incomplete, "official")
    extra = dict(sd, **{"transformer.something_new": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key.*something_new"):
        convert_state_dict(extra, "official")
    inconsistent = dict(sd)
    inconsistent["transformer.decoder.bbox_embed.2.layers.0.bias"] = torch.zeros(256)
    with pytest.raises(CheckpointError, match="differ"):
        convert_state_dict(inconsistent, "official")
    plain = synthetic_official("plain")
    plain["class_embed.4.bias"] = plain["class_embed.4.bias"] + 1
    with pytest.raises(CheckpointError, match="shared class heads"):
        convert_state_dict(plain, "official")

    converted = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(convert_checkpoint(good_file), converted)
    with pytest.raises(CheckpointError, match="already in this project's detectron2 format"):
        convert_checkpoint(converted)
    with pytest.raises(CheckpointError, match="not huggingface"):
        convert_checkpoint(good_file, format="huggingface")


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(container, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if container == "torch.save":
        torch.save({"model": {"transformer.level_embed": torch.zeros(4, 256)},
                    "args": _Exploit(marker)}, path)
    else:  # a bare pickle (torch's legacy container is one too)
        with open(path, "wb") as f:
            pickle.dump({"args": _Exploit(marker), "model": {}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused.*system"):
        convert_checkpoint(str(path))
    assert not marker.exists()


# --------------------------------------------------------------------------------- tool
def test_command_line_tool(good_file, tmp_path, capsys):
    import runpy

    tool = runpy.run_path(os.path.join(REPO, "tools", "convert_weights.py"))
    out = str(tmp_path / "out.pth")
    assert tool["main"]([good_file, out]) == 0
    printed = capsys.readouterr().out
    assert "variant:       plain" in printed
    assert f"--config-file configs/deformable_detr_R_50_50ep.yaml MODEL.WEIGHTS {out}" in printed
    assert torch.load(out, weights_only=True)["model"]["query_embed.weight"].shape == (300, 512)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    assert tool["main"]([str(bad), out]) == 1
    assert "error:" in capsys.readouterr().err
