"""The five released model variants, their configs, and the hyper-parameters a checkpoint has.

:data:`VARIANTS` is the one table of the released models (config, official checkpoint, published
AP) that the converter, the benchmarks and the tests read.

A checkpoint's tensors fix most hyper-parameters (widths, depths, levels, queries, heads);
:func:`select_variant` picks the released config they match and lists the config overrides
needed where they differ (e.g. a model fine-tuned with fewer queries or classes).
"""
from __future__ import annotations

import dataclasses

__all__ = ["VARIANTS", "ModelHParams", "Variant", "select_variant"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A released Deformable DETR model and the config in ``configs/`` that builds it."""

    name: str
    #: Path of the shipped config, relative to the repository root.
    config_file: str
    with_box_refine: bool
    two_stage: bool
    num_feature_levels: int
    dilation: bool
    #: Name of the key list in ``tests/data/official_checkpoint_keys/`` (``<name>.txt``).
    official_name: str
    #: File name of the official release's checkpoint.
    checkpoint_file: str
    #: COCO val2017 box AP of the official checkpoint (as the reference repository and the
    #: config's header state it).
    coco_ap: float


VARIANTS = {
    v.name: v
    for v in [
        Variant("plain", "configs/deformable_detr_R_50_50ep.yaml",
                with_box_refine=False, two_stage=False, num_feature_levels=4, dilation=False,
                official_name="plain", checkpoint_file="r50_deformable_detr-checkpoint.pth",
                coco_ap=44.5),
        Variant("box_refine", "configs/deformable_detr_R_50_box_refine_50ep.yaml",
                with_box_refine=True, two_stage=False, num_feature_levels=4, dilation=False,
                official_name="refine",
                checkpoint_file="r50_deformable_detr_plus_iterative_bbox_refinement"
                                "-checkpoint.pth",
                coco_ap=46.2),
        Variant("two_stage", "configs/deformable_detr_R_50_two_stage_50ep.yaml",
                with_box_refine=True, two_stage=True, num_feature_levels=4, dilation=False,
                official_name="two_stage",
                checkpoint_file="r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus"
                                "_two_stage-checkpoint.pth",
                coco_ap=46.9),
        Variant("single_scale", "configs/deformable_detr_R_50_single_scale_50ep.yaml",
                with_box_refine=False, two_stage=False, num_feature_levels=1, dilation=False,
                official_name="single_scale",
                checkpoint_file="r50_deformable_detr_single_scale-checkpoint.pth",
                coco_ap=39.4),
        Variant("single_scale_dc5", "configs/deformable_detr_R_50_single_scale_dc5_50ep.yaml",
                with_box_refine=False, two_stage=False, num_feature_levels=1, dilation=True,
                official_name="single_scale_dc5",
                checkpoint_file="r50_deformable_detr_single_scale_dc5-checkpoint.pth",
                coco_ap=41.5),
    ]
}


@dataclasses.dataclass
class ModelHParams:
    """What a checkpoint says about the model that produced it.

    Fields left None are not recorded in the checkpoint (then the released value is assumed).
    """

    hidden_dim: int = 256
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    num_queries: int | None = 300
    num_classes: int = 80
    with_box_refine: bool = False
    two_stage: bool = False
    #: heads * levels * points of the encoder / decoder attention (from tensor shapes).
    enc_heads_points: int = 8 * 4 * 4
    dec_heads_points: int = 8 * 4 * 4
    nheads: int | None = None
    enc_n_points: int | None = None
    dec_n_points: int | None = None
    dilation: bool | None = None
    resnet_depth: int = 50
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    width_per_group: int = 64

    def resolved_heads_points(self) -> tuple:
        """(nheads, enc_n_points, dec_n_points), assuming 8 heads when not recorded."""
        nheads = self.nheads or 8
        out = [nheads]
        for total, given, what in ((self.enc_heads_points, self.enc_n_points, "encoder"),
                                   (self.dec_heads_points, self.dec_n_points, "decoder")):
            per_head_level = total // (nheads * self.num_feature_levels)
            if per_head_level * nheads * self.num_feature_levels != total:
                raise ValueError(
                    f"{what} attention has {total} sampling weights, not a multiple of heads "
                    f"({nheads}) x levels ({self.num_feature_levels})"
                )
            if given is not None and given != per_head_level:
                raise ValueError(f"{what} n_points {given} does not match the weights "
                                 f"({per_head_level} per head and level)")
            out.append(per_head_level)
        return tuple(out)


# What every released config sets (values of keys a checkpoint can contradict).
_RELEASED = {
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM": 256,
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS": 6,
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS": 6,
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD": 1024,
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES": 300,
    "MODEL.DEFORMABLE_DETR.NUM_CLASSES": 80,
    "MODEL.DEFORMABLE_DETR.NHEADS": 8,
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS": 4,
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS": 4,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
}


def select_variant(hp: ModelHParams, force: str | None = None) -> tuple:
    """Pick the released config for a checkpoint's hyper-parameters.

    Args:
        hp: from the checkpoint.
        force: a variant name chosen by the user; it must agree with the checkpoint (only the
            DC5 dilation cannot be read from tensor shapes).

    Returns:
        (variant, overrides, notes): ``overrides`` is a flat ``[KEY, VALUE, ...]`` list for
        the command line; ``notes`` are human-readable remarks.
    """
    notes: list[str] = []
    overrides: list[str] = []
    if hp.two_stage and not hp.with_box_refine:
        raise ValueError("a two-stage checkpoint without box refinement is not a released "
                         "layout (two-stage needs the per-layer heads of box refinement)")
    if force is not None:
        if force not in VARIANTS:
            raise ValueError(f"unknown variant {force!r}; choose from {sorted(VARIANTS)}")
        variant = VARIANTS[force]
        if (variant.two_stage, variant.with_box_refine) != (hp.two_stage, hp.with_box_refine):
            raise ValueError(
                f"variant {force!r} does not match the checkpoint (two_stage={hp.two_stage}, "
                f"with_box_refine={hp.with_box_refine})"
            )
        if (variant.num_feature_levels == 1) != (hp.num_feature_levels == 1):
            raise ValueError(f"variant {force!r} does not match the checkpoint's "
                             f"{hp.num_feature_levels} feature levels")
    elif hp.two_stage:
        variant = VARIANTS["two_stage"]
    elif hp.with_box_refine:
        variant = VARIANTS["box_refine"]
    elif hp.num_feature_levels == 1:
        if hp.dilation is None:
            notes.append(
                "single-scale checkpoint: whether res5 is dilated (DC5) is not recorded in the "
                "weights; assuming no dilation. For the DC5 release use --variant "
                "single_scale_dc5 (config "
                f"{VARIANTS['single_scale_dc5'].config_file})"
            )
        variant = VARIANTS["single_scale_dc5" if hp.dilation else "single_scale"]
    else:
        variant = VARIANTS["plain"]

    if hp.num_feature_levels == 1 and (hp.with_box_refine or hp.two_stage):
        overrides += ["MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", "1",
                      "MODEL.DEFORMABLE_DETR.IN_FEATURES", "['res5']"]
    elif hp.num_feature_levels not in (1, 4):
        overrides += ["MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", str(hp.num_feature_levels)]
        notes.append(f"{hp.num_feature_levels} feature levels is not a released layout: check "
                     "MODEL.DEFORMABLE_DETR.IN_FEATURES")
    if hp.dilation is not None and hp.dilation != variant.dilation:
        overrides += ["MODEL.RESNETS.RES5_DILATION", "2" if hp.dilation else "1"]

    nheads, enc_points, dec_points = hp.resolved_heads_points()
    values = {
        "MODEL.DEFORMABLE_DETR.HIDDEN_DIM": hp.hidden_dim,
        "MODEL.DEFORMABLE_DETR.ENC_LAYERS": hp.enc_layers,
        "MODEL.DEFORMABLE_DETR.DEC_LAYERS": hp.dec_layers,
        "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD": hp.dim_feedforward,
        "MODEL.DEFORMABLE_DETR.NUM_QUERIES": hp.num_queries,
        "MODEL.DEFORMABLE_DETR.NUM_CLASSES": hp.num_classes,
        "MODEL.DEFORMABLE_DETR.NHEADS": nheads,
        "MODEL.DEFORMABLE_DETR.ENC_N_POINTS": enc_points,
        "MODEL.DEFORMABLE_DETR.DEC_N_POINTS": dec_points,
        "MODEL.RESNETS.DEPTH": hp.resnet_depth,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": hp.stem_out_channels,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": hp.res2_out_channels,
        "MODEL.RESNETS.WIDTH_PER_GROUP": hp.width_per_group,
    }
    for key, value in values.items():
        if value is not None and value != _RELEASED[key]:
            overrides += [key, str(value)]
    if hp.num_queries is None:
        notes.append("two-stage: the number of proposals is not recorded in the weights; the "
                     "config's MODEL.DEFORMABLE_DETR.NUM_QUERIES (300) is used")
    return variant, overrides, notes
