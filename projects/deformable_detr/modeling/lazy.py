"""Building the model from parts, as detectron2's LazyConfig does (``LazyCall`` + ``instantiate``).

A LazyConfig cannot hand one built object to two others, so the multi-scale adapter, which
needs the backbone's output shapes, is given as its remaining arguments and built here on
the backbone it belongs to (``configs/lazy/``)::

    model = L(build_deformable_detr)(
        backbone=L(ResNet)(...),                      # or ViT + SimpleFeaturePyramid, Swin, ...
        adapter=dict(in_features=["res3", "res4", "res5"]),
        transformer=L(DeformableTransformer)(d_model=256, num_feature_levels=4, ...),
        criterion=L(SetCriterion)(num_classes="${..num_classes}", matcher=...),
        num_classes=80, num_queries=300, pixel_mean=[...], pixel_std=[...])
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .meta_arch import DeformableDETR
from .multiscale_adapter import MultiScaleAdapter

__all__ = ["build_deformable_detr"]


def build_deformable_detr(*, backbone: nn.Module, adapter: Mapping | MultiScaleAdapter,
                          transformer: nn.Module, **kwargs: Any) -> DeformableDETR:
    """:class:`DeformableDETR` whose adapter reads its input shapes from ``backbone``.

    Args:
        backbone: a detectron2 ``Backbone`` (``output_shape()`` names its features).
        adapter: :class:`MultiScaleAdapter`'s arguments but ``input_shape``:
            ``in_features`` (backbone outputs, in level order) and optionally ``hidden_dim``
            and ``num_levels``, which default to the transformer's ``d_model`` and
            ``num_feature_levels``; or an adapter already built.
        transformer: the :class:`DeformableTransformer`.
        kwargs: the other arguments of :class:`DeformableDETR` (``criterion``,
            ``num_classes``, ``num_queries``, ``pixel_mean``, ``pixel_std``, ...).
    """
    if isinstance(adapter, Mapping):
        args = dict(adapter)
        if "input_shape" in args:
            raise ValueError("adapter: leave out input_shape, it is read from the backbone")
        args.setdefault("hidden_dim", transformer.d_model)
        args.setdefault("num_levels", transformer.num_feature_levels)
        if "in_features" in args:
            args["in_features"] = list(args["in_features"])
        adapter = MultiScaleAdapter(backbone.output_shape(), **args)
    return DeformableDETR(backbone=backbone, adapter=adapter, transformer=transformer, **kwargs)
