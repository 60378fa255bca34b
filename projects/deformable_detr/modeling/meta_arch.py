"""Deformable DETR (Zhu et al., ICLR 2021) as a detectron2 meta-architecture."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from torch import nn

from ..config import validate_config
from .box_ops import box_xyxy_to_cxcywh, refine_boxes
from .criterion import SetCriterion
from .deformable_transformer import DeformableTransformer
from .frozen_bn_folding import fold_frozen_batchnorm
from .heads import build_prediction_heads
from .matcher import HungarianMatcher
from .multiscale_adapter import MultiScaleAdapter
from .padding import pad_images
from .position_encoding import PositionEmbeddingSine
from .postprocess import topk_detections

__all__ = ["DeformableDETR"]


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """Deformable DETR: backbone, multi-scale adapter, deformable transformer and set
    prediction heads, trained with Hungarian-matched set losses.

    Variants (from the transformer): plain, iterative box refinement
    (``transformer.with_box_refine``) and two-stage (``transformer.two_stage``), each with
    any number of feature levels (single scale: one backbone level, one level in total).

    Parameter names follow the released checkpoints: ``transformer.*``, ``class_embed.{i}``,
    ``bbox_embed.{i}``, ``query_embed`` (one-stage); ``adapter.input_proj.*`` is the
    released ``input_proj.*``; ``backbone.*`` is detectron2's backbone.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        adapter: MultiScaleAdapter,
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        aux_loss: bool = True,
        detections_per_image: int = 100,
        input_format: str | None = "RGB",
        backbone_channels_last: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 backbone; ``adapter`` must be built on its output_shape().
            adapter: projects backbone features to ``transformer.num_feature_levels`` maps.
            transformer: the deformable transformer (decides refinement and two-stage).
            criterion: the training losses.
            num_classes: C, without background.
            num_queries: Q, learned queries or (two-stage) proposals kept.
            pixel_mean, pixel_std: per-channel normalisation, in the input's channel order.
            aux_loss: add the losses of every decoder layer but the last.
            detections_per_image: k of the inference top-k.
            input_format: channel order of the input images (for visualisation).
            backbone_channels_last: keep the backbone's weights and run its input in the
                channels-last memory layout (faster convolutions on the CPU; the same
                model, the same state_dict).
        """
        super().__init__()
        if adapter.num_levels != transformer.num_feature_levels:
            raise ValueError(f"adapter has {adapter.num_levels} levels, transformer "
                             f"{transformer.num_feature_levels}")
        if adapter.hidden_dim != transformer.d_model:
            raise ValueError(f"adapter has {adapter.hidden_dim} channels, transformer "
                             f"{transformer.d_model}")
        if criterion.num_classes != num_classes:
            raise ValueError(f"criterion has {criterion.num_classes} classes, the model "
                             f"{num_classes}")
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(f"pixel_mean {list(pixel_mean)} and pixel_std {list(pixel_std)} "
                             "differ in length")
        # Frozen norms cost a pass over every feature map; folded into the convolutions they
        # cost none (same parameters and keys).
        self.backbone = fold_frozen_batchnorm(backbone)
        self.adapter = adapter
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.detections_per_image = detections_per_image
        self.input_format = input_format
        self.backbone_channels_last = backbone_channels_last
        if backbone_channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.two_stage = transformer.two_stage

        hidden_dim = transformer.d_model
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.class_embed, self.bbox_embed = build_prediction_heads(
            hidden_dim, num_classes, transformer.decoder.num_layers,
            with_box_refine=transformer.with_box_refine, two_stage=self.two_stage,
        )
        if not self.two_stage:
            # query_pos in the first half, tgt in the second.
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        elif transformer.two_stage_num_proposals != num_queries:
            raise ValueError(f"two-stage: transformer keeps {transformer.two_stage_num_proposals}"
                             f" proposals but num_queries is {num_queries}")

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DEFORMABLE_DETR
        backbone = build_backbone(cfg)
        input_shape = backbone.output_shape()
        validate_config(cfg, input_shape)
        adapter = MultiScaleAdapter(input_shape, c.IN_FEATURES, c.HIDDEN_DIM, c.NUM_FEATURE_LEVELS)
        transformer = DeformableTransformer(
            d_model=c.HIDDEN_DIM,
            n_heads=c.NHEADS,
            num_encoder_layers=c.ENC_LAYERS,
            num_decoder_layers=c.DEC_LAYERS,
            dim_feedforward=c.DIM_FEEDFORWARD,
            dropout=c.DROPOUT,
            num_feature_levels=c.NUM_FEATURE_LEVELS,
            dec_n_points=c.DEC_N_POINTS,
            enc_n_points=c.ENC_N_POINTS,
            with_box_refine=c.WITH_BOX_REFINE,
            two_stage=c.TWO_STAGE,
            two_stage_num_proposals=c.NUM_QUERIES,
            attn_impl=c.ATTN_IMPL,
        )
        matcher = HungarianMatcher(cost_class=c.COST_CLASS, cost_bbox=c.COST_BBOX,
                                   cost_giou=c.COST_GIOU, focal_alpha=c.FOCAL_ALPHA)
        criterion = SetCriterion(c.NUM_CLASSES, matcher, class_weight=c.CLS_WEIGHT,
                                 bbox_weight=c.BBOX_WEIGHT, giou_weight=c.GIOU_WEIGHT,
                                 focal_alpha=c.FOCAL_ALPHA,
                                 one_to_many_layers=c.ONE_TO_MANY_LAYERS,
                                 one_to_many_k=c.ONE_TO_MANY_K)
        return {
            "backbone": backbone,
            "adapter": adapter,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": c.NUM_CLASSES,
            "num_queries": c.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": c.AUX_LOSS,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
            "backbone_channels_last": c.BACKBONE_CHANNELS_LAST,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: detectron2 inputs, dicts with "image" (uint8 or float [C, H, W] in
                ``input_format``, pixel values 0..255), in training "instances" (gt_boxes
                xyxy in the image's pixels, gt_classes in [0, num_classes)), and optionally
                "height"/"width" (the size to report detections at).

        Returns:
            training: dict of weighted losses (see :class:`SetCriterion`).
            inference: per image ``{"instances": Instances}`` with pred_boxes (xyxy at the
            requested height/width), scores and pred_classes, the top
            ``detections_per_image`` (query, class) pairs.
        """
        if not self.training:
            return self.inference(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("training needs 'instances' (gt_boxes, gt_classes) in every input; "
                             "images without objects need empty Instances")
        images = self.preprocess_image(batched_inputs)
        outputs = self._forward_images(images)
        if not self.aux_loss:
            outputs.pop("aux_outputs")
        targets = self.prepare_targets([x["instances"] for x in batched_inputs],
                                       images.image_sizes)
        return self.criterion(outputs, targets)

    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True):
        """Detections of the top ``detections_per_image`` (query, class) pairs.

        With ``do_postprocess`` the boxes are rescaled to each input's "height"/"width" (if
        given) by ``detector_postprocess`` and wrapped as ``{"instances": ...}``; otherwise
        Instances at the network input size are returned.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self._forward_images(images)
        results = topk_detections(outputs["pred_logits"], outputs["pred_boxes"],
                                  images.image_sizes, self.detections_per_image)
        if not do_postprocess:
            return results
        processed = []
        for result, x, (h, w) in zip(results, batched_inputs, images.image_sizes):
            height = x.get("height", h)
            width = x.get("width", w)
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def raw_outputs(self, batched_inputs: list[dict]) -> dict:
        """The network outputs before matching or post-processing.

        Returns:
            dict with "pred_logits" [N, Q, C], "pred_boxes" [N, Q, 4] (cxcywh normalised by
            each image's unpadded size), "aux_outputs" (one such dict per decoder layer
            except the last) and, two-stage, "enc_outputs" (logits [N, S, C] and boxes
            [N, S, 4] of every encoder proposal).
        """
        return self._forward_images(self.preprocess_image(batched_inputs))

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise and zero-pad to a batch: to the largest size, or the square the backbone
        asks for (``padding_constraints``, e.g. ViT), rounded up to its divisibility
        (:func:`.padding.pad_images`)."""
        images = []
        for i, x in enumerate(batched_inputs):
            image = x["image"]
            if image.dim() != 3 or image.shape[0] != self.pixel_mean.shape[0]:
                raise ValueError(f"input {i}: 'image' must be [{self.pixel_mean.shape[0]}, H, W],"
                                 f" got {list(image.shape)}")
            images.append((image.to(self.device) - self.pixel_mean) / self.pixel_std)
        return pad_images(images, self.backbone)

    @staticmethod
    def padding_mask(images: ImageList) -> torch.Tensor:
        """bool [N, H, W] of the padded batch, True at padded pixels."""
        n, _, h, w = images.tensor.shape
        mask = torch.ones((n, h, w), dtype=torch.bool, device=images.tensor.device)
        for i, (hi, wi) in enumerate(images.image_sizes):
            mask[i, :hi, :wi] = False
        return mask

    def _forward_images(self, images: ImageList) -> dict:
        x = images.tensor
        if self.backbone_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        srcs, masks = self.adapter(features, self.padding_mask(images))
        return self.forward_multiscale(srcs, masks)

    def forward_multiscale(self, srcs: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
        """Transformer and heads on the adapter's output.

        Args:
            srcs: L maps [N, C, H_l, W_l]; masks: L bool [N, H_l, W_l], True at padding.

        Returns:
            the dict of :meth:`raw_outputs`.
        """
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        out = self.transformer(
            srcs, masks, pos,
            query_embed=None if self.two_stage else self.query_embed.weight,
            class_embed=self.class_embed, bbox_embed=self.bbox_embed,
        )
        decoder_states = out["decoder_states"]
        # The reference each layer's boxes refine: the initial one, then each layer's output.
        references = [out["init_reference"], *out["inter_references"][:-1]]
        outputs_classes, outputs_coords = [], []
        for lvl, (state, reference) in enumerate(zip(decoder_states, references)):
            outputs_classes.append(self.class_embed[lvl](state))
            outputs_coords.append(refine_boxes(self.bbox_embed[lvl](state), reference))

        outputs = {
            "pred_logits": outputs_classes[-1],
            "pred_boxes": outputs_coords[-1],
            "aux_outputs": [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(outputs_classes[:-1], outputs_coords[:-1])
            ],
        }
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": out["enc_outputs_class"],
                "pred_boxes": out["enc_outputs_coord_unact"].sigmoid(),
            }
        return outputs

    def prepare_targets(self, instances: list[Instances], image_sizes) -> list[dict]:
        """Targets for the criterion: "labels" [T] and "boxes" [T, 4] cxcywh normalised by each
        image's own unpadded (h, w)."""
        targets = []
        for inst, (h, w) in zip(instances, image_sizes):
            inst = inst.to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor.float()) / scale
            targets.append({"labels": inst.gt_classes.long(), "boxes": boxes})
        return targets
