"""Box ops, Hungarian matcher and set criterion against independent float64 computations."""
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision

from deformable_detr.modeling import (
    HungarianMatcher,
    SetCriterion,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
    paired_generalized_box_iou,
    sigmoid_focal_loss,
)
from deformable_detr.modeling import criterion as criterion_module

# ----------------------------------------------------------------- independent references


def np_giou(a, b):
    """GIoU of two xyxy boxes, float64, written from the definition."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area_a + area_b - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def np_xyxy(b):
    cx, cy, w, h = np.asarray(b, np.float64)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_focal(logit, target, alpha=0.25, gamma=2.0):
    """Per-element focal loss -alpha_t (1 - p_t)^gamma log(p_t), float64."""
    p = np_sigmoid(logit)
    p_t = np.where(target == 1, p, 1 - p)
    alpha_t = np.where(target == 1, alpha, 1 - alpha)
    return -alpha_t * (1 - p_t) ** gamma * np.log(p_t)


def np_match_cost(logits, boxes, label, tgt_box, w_class=2.0, w_bbox=5.0, w_giou=2.0):
    p = np_sigmoid(logits[label])
    cls = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
    l1 = np.abs(np.asarray(boxes, np.float64) - np.asarray(tgt_box, np.float64)).sum()
    return w_bbox * l1 + w_class * cls - w_giou * np_giou(np_xyxy(boxes), np_xyxy(tgt_box))


def brute_force_assignment(cost):
    """Minimum-cost injective map targets -> queries, by enumeration: {target: query}."""
    q, t = cost.shape
    best, best_perm = math.inf, None
    for perm in itertools.permutations(range(q), t):
        c = sum(cost[perm[j], j] for j in range(t))
        if c < best:
            best, best_perm = c, perm
    return {j: best_perm[j] for j in range(t)}


# ------------------------------------------------------------------------------- box ops


def test_box_conversions_by_hand():
    b = torch.tensor([[0.5, 0.4, 0.2, 0.6]])
    assert torch.allclose(box_cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.1, 0.6, 0.7]]))
    assert torch.allclose(box_xyxy_to_cxcywh(torch.tensor([[0.4, 0.1, 0.6, 0.7]])), b)


def test_generalized_box_iou_against_definition():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(6, 2, generator=g)
    a = torch.cat([xy, xy + 0.05 + torch.rand(6, 2, generator=g)], 1).double()
    xy = torch.rand(4, 2, generator=g)
    b = torch.cat([xy, xy + 0.05 + torch.rand(4, 2, generator=g)], 1).double()
    # Disjoint boxes (negative GIoU) and identical boxes (GIoU 1) are in the set.
    b[0] = torch.tensor([5.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    b[1] = a[2]
    got = generalized_box_iou(a, b)
    expected = np.array([[np_giou(x, y) for y in b.numpy()] for x in a.numpy()])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert got[2, 1] == pytest.approx(1.0) and (got[:, 0] < 0).all()
    paired = paired_generalized_box_iou(a[:4], b)
    np.testing.assert_allclose(paired.numpy(), np.diag(expected[:4]), rtol=1e-12)


def test_generalized_box_iou_rejects_degenerate_boxes():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[0.0, 0.0, -1.0, 1.0]]), good)
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), good)


def test_inverse_sigmoid_clamps_like_published():
    x = torch.tensor([-0.5, 0.0, 1e-7, 0.3, 1.0, 2.0], dtype=torch.float64)
    expected = [math.log(1e-5), math.log(1e-5), math.log(1e-5 / (1 - 1e-7)), math.log(0.3 / 0.7),
                math.log(1 / 1e-5), math.log(1 / 1e-5)]
    np.testing.assert_allclose(inverse_sigmoid(x).numpy(), expected, rtol=1e-12)


# ------------------------------------------------------------------------------- matcher


def test_matcher_finds_optimal_assignment_against_brute_force():
    g = torch.Generator().manual_seed(1)
    q, c = 5, 4
    logits = torch.randn(2, q, c, generator=g, dtype=torch.float64)
    xy = 0.2 + 0.5 * torch.rand(2, q, 2, generator=g, dtype=torch.float64)
    boxes = torch.cat([xy, 0.05 + 0.3 * torch.rand(2, q, 2, generator=g, dtype=torch.float64)],
                      -1)
    targets = [
        {"labels": torch.tensor([2, 0, 3]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1],
                                [0.45, 0.4, 0.25, 0.3]], dtype=torch.float64)},
        {"labels": torch.tensor([1]),
         "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=torch.float64)},
    ]
    indices = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b, (src, tgt) in enumerate(indices):
        t = targets[b]
        cost = np.array([[np_match_cost(logits[b, i].numpy(), boxes[b, i].numpy(),
                                        int(t["labels"][j]), t["boxes"][j].numpy())
                          for j in range(len(t["labels"]))] for i in range(q)])
        expected = brute_force_assignment(cost)
        assert dict(zip(tgt.tolist(), src.tolist())) == expected
        assert src.dtype == torch.int64 and len(src) == len(t["labels"])


def test_matcher_match_layers_against_brute_force_per_layer():
    """Several layers' outputs matched at once: each (layer, image) gets the brute-force
    optimum of its own cost matrix (the layers are not mixed up)."""
    g = torch.Generator().manual_seed(3)
    layers, q, c = 3, 5, 4
    outputs = []
    for _ in range(layers):
        xy = 0.2 + 0.5 * torch.rand(2, q, 2, generator=g, dtype=torch.float64)
        wh = 0.05 + 0.3 * torch.rand(2, q, 2, generator=g, dtype=torch.float64)
        outputs.append({"pred_logits": torch.randn(2, q, c, generator=g, dtype=torch.float64),
                        "pred_boxes": torch.cat([xy, wh], -1)})
    targets = [
        {"labels": torch.tensor([1]),
         "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=torch.float64)},
        {"labels": torch.tensor([2, 0, 3]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1],
                                [0.45, 0.4, 0.25, 0.3]], dtype=torch.float64)},
    ]
    all_indices = HungarianMatcher().match_layers(outputs, targets)
    assert len(all_indices) == layers
    for out, indices in zip(outputs, all_indices):
        for b, (src, tgt) in enumerate(indices):
            t = targets[b]
            cost = np.array([[np_match_cost(out["pred_logits"][b, i].numpy(),
                                            out["pred_boxes"][b, i].numpy(),
                                            int(t["labels"][j]), t["boxes"][j].numpy())
                              for j in range(len(t["labels"]))] for i in range(q)])
            assert dict(zip(tgt.tolist(), src.tolist())) == brute_force_assignment(cost)


def test_matcher_beats_greedy_on_hand_made_case():
    # L1 costs on cx only: q0 (0.5) -> t0 (0.6) 0.1, -> t1 (0.3) 0.2; q1 (0.75) -> t0 0.15,
    # -> t1 0.45. Greedy takes the cheapest pair q0-t0 first (total 0.55); the optimum is
    # q0-t1, q1-t0 (0.35).
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.75, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0, 0]),
                "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.3, 0.5, 0.2, 0.2]])}]
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    (src, tgt), = matcher({"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": boxes}, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


def test_matcher_class_cost_prefers_confident_query():
    # Identical boxes: only the focal class cost at the target class decides.
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(1, 3, 1)
    logits = torch.tensor([[[3.0, -3.0], [-3.0, 3.0], [0.0, 0.0]]])
    targets = [{"labels": torch.tensor([1, 0]), "boxes": boxes[0, :2].clone()}]
    (src, tgt), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


def test_matcher_handles_images_without_targets():
    out = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.2}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}
    indices = HungarianMatcher()(out, [empty, one])
    assert [len(i) for i, _ in indices] == [0, 1]
    indices = HungarianMatcher()(out, [empty, empty])
    assert all(len(i) == 0 and len(j) == 0 for i, j in indices)


def test_matcher_reports_non_finite_predictions():
    out = {"pred_logits": torch.full((1, 2, 3), float("nan")),
           "pred_boxes": torch.full((1, 2, 4), 0.5)}
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}]
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianMatcher()(out, tgt)


# ----------------------------------------------------------------------------- criterion


def test_sigmoid_focal_loss_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    targets = (torch.rand(2, 7, 5, generator=g) > 0.8).double()
    got = sigmoid_focal_loss(logits, targets, num_boxes=3.0)
    ref = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2,
                                             reduction="sum") / 3.0
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


def _hand_case():
    """Two images, 3 queries, 4 classes. Image 0's targets sit exactly on queries 2 and 0,
    image 1's on query 1, so the optimal matching is unambiguous."""
    logits = torch.tensor([
        [[1.0, -2.0, 0.5, -1.0], [-1.5, 0.2, -0.3, 2.0], [0.1, 1.2, -0.7, -2.2]],
        [[-0.4, 0.9, -1.1, 0.3], [2.2, -0.6, 0.0, -1.7], [-2.0, -0.1, 1.4, 0.6]],
    ], dtype=torch.float64)
    boxes = torch.tensor([
        [[0.30, 0.40, 0.20, 0.30], [0.80, 0.20, 0.10, 0.10], [0.55, 0.55, 0.40, 0.30]],
        [[0.20, 0.70, 0.30, 0.20], [0.50, 0.50, 0.50, 0.60], [0.90, 0.90, 0.10, 0.10]],
    ], dtype=torch.float64)
    t0 = torch.tensor([[0.56, 0.54, 0.42, 0.28], [0.31, 0.41, 0.19, 0.30]], dtype=torch.float64)
    t1 = torch.tensor([[0.52, 0.48, 0.50, 0.62]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([1, 0]), "boxes": t0},
               {"labels": torch.tensor([0]), "boxes": t1}]
    matches = [{2: 0, 0: 1}, {1: 0}]  # per image {query: target}
    return logits, boxes, targets, matches


def _expected_losses(logits, boxes, targets, matches, num_boxes):
    logits, boxes = logits.numpy(), boxes.numpy()
    onehot = np.zeros_like(logits)
    l1 = giou = 0.0
    for b, m in enumerate(matches):
        for q, t in m.items():
            onehot[b, q, int(targets[b]["labels"][t])] = 1
            tb = targets[b]["boxes"][t].numpy()
            l1 += np.abs(boxes[b, q] - tb).sum()
            giou += 1 - np_giou(np_xyxy(boxes[b, q]), np_xyxy(tb))
    ce = np_focal(logits, onehot).sum()
    return {"loss_ce": 2 * ce / num_boxes, "loss_bbox": 5 * l1 / num_boxes,
            "loss_giou": 2 * giou / num_boxes}


def test_criterion_weighted_losses_by_hand():
    logits, boxes, targets, matches = _hand_case()
    out = {"pred_logits": logits, "pred_boxes": boxes}
    indices = HungarianMatcher()(out, targets)
    assert [dict(zip(i.tolist(), j.tolist())) for i, j in indices] == matches
    losses = SetCriterion(4, HungarianMatcher())(out, targets)
    expected = _expected_losses(logits, boxes, targets, matches, num_boxes=3)
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-10), k


def test_criterion_aux_and_enc_losses():
    logits, boxes, targets, matches = _hand_case()
    # aux layer: the same predictions; enc: class-agnostic (all targets label 0).
    enc_logits = logits.flip(-1)
    out = {"pred_logits": logits, "pred_boxes": boxes,
           "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}] * 2,
           "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": boxes}}
    losses = SetCriterion(4, HungarianMatcher())(out, targets)
    names = {f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou")
             for s in ("", "_0", "_1", "_enc")}
    assert set(losses) == names
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[k + "_0"].item() == pytest.approx(losses[k].item(), rel=1e-12)
    zero_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]}
                    for t in targets]
    # With labels 0 the matching is still geometric here (same boxes), so it is unchanged.
    expected = _expected_losses(enc_logits, boxes, zero_targets, matches, num_boxes=3)
    for k, v in expected.items():
        assert losses[k + "_enc"].item() == pytest.approx(v, rel=1e-10), k


def test_criterion_layers_get_their_own_losses():
    """Auxiliary layers with different predictions (and a different matching): each layer's
    losses are those of its own predictions and matching, computed independently."""
    logits, boxes, targets, matches = _hand_case()
    rolled = {"pred_logits": logits.roll(1, dims=1) * 0.5,
              "pred_boxes": (boxes.roll(1, dims=1) + 0.01).clamp(max=1)}
    rolled_matches = [{(q + 1) % 3: t for q, t in m.items()} for m in matches]
    shifted = {"pred_logits": logits - 0.3, "pred_boxes": boxes * 0.97}
    out = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [rolled, shifted]}
    losses = SetCriterion(4, HungarianMatcher())(out, targets)
    for suffix, layer, layer_matches in (("", out, matches), ("_0", rolled, rolled_matches),
                                         ("_1", shifted, matches)):
        expected = _expected_losses(layer["pred_logits"], layer["pred_boxes"], targets,
                                    layer_matches, num_boxes=3)
        for k, v in expected.items():
            assert losses[k + suffix].item() == pytest.approx(v, rel=1e-10), k + suffix


def test_criterion_without_targets_clamps_num_boxes():
    logits, boxes, _, _ = _hand_case()
    empty = {"labels": torch.zeros(0, dtype=torch.int64),
             "boxes": torch.zeros(0, 4, dtype=torch.float64)}
    losses = SetCriterion(4, HungarianMatcher())(
        {"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    # Every query is background; divided by max(0, 1) = 1.
    assert losses["loss_ce"].item() == pytest.approx(
        2 * np_focal(logits.numpy(), np.zeros((2, 3, 4))).sum(), rel=1e-10)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


def test_criterion_num_boxes_is_averaged_over_processes(monkeypatch):
    """Simulates a second process holding 5 boxes: num_boxes = (3 + 5) / 2 = 4."""
    calls = []

    def fake_all_reduce(t):
        calls.append(t.clone())
        t += 5

    monkeypatch.setattr(criterion_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", fake_all_reduce)
    logits, boxes, targets, matches = _hand_case()
    losses = SetCriterion(4, HungarianMatcher())(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert len(calls) == 1 and calls[0].item() == 3
    expected = _expected_losses(logits, boxes, targets, matches, num_boxes=4)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-10), k


def test_criterion_rejects_bad_class_ids():
    logits, boxes, targets, _ = _hand_case()
    targets[1]["labels"] = torch.tensor([4])
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 4\)"):
        SetCriterion(4, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes},
                                            targets)


def _random_layer(g, n, q, c):
    xy = 0.2 + 0.5 * torch.rand(n, q, 2, generator=g, dtype=torch.float64)
    wh = 0.05 + 0.3 * torch.rand(n, q, 2, generator=g, dtype=torch.float64)
    return {"pred_logits": torch.randn(n, q, c, generator=g, dtype=torch.float64),
            "pred_boxes": torch.cat([xy, wh], -1)}


def _brute_force_losses(layer, targets, num_boxes):
    """A layer's weighted losses under its optimal matching, both computed here in float64:
    the matching by enumeration over the costs of np_match_cost."""
    logits, boxes = layer["pred_logits"], layer["pred_boxes"]
    matches = []
    for b, t in enumerate(targets):
        cost = np.array([[np_match_cost(logits[b, i].numpy(), boxes[b, i].numpy(),
                                        int(t["labels"][j]), t["boxes"][j].numpy())
                          for j in range(len(t["labels"]))] for i in range(logits.shape[1])])
        matches.append({q: j for j, q in brute_force_assignment(cost).items()})
    return _expected_losses(logits, boxes, targets, matches, num_boxes)


def test_criterion_one_to_many_layers_against_brute_force():
    """The first m decoder layers are matched to the targets repeated k times (k queries per
    object, normalised by k x the number of boxes); the other layers and the last one keep
    one-to-one matching. Every layer's losses against an enumeration of all matchings."""
    g = torch.Generator().manual_seed(3)
    n, q, c, k, m = 2, 7, 4, 3, 2
    targets = [
        {"labels": torch.tensor([2, 0]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.1]],
                               dtype=torch.float64)},
        {"labels": torch.tensor([1]),
         "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=torch.float64)},
    ]
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)}
                for t in targets]
    aux = [_random_layer(g, n, q, c) for _ in range(3)]
    out = {**_random_layer(g, n, q, c), "aux_outputs": aux}
    losses = SetCriterion(4, HungarianMatcher(), one_to_many_layers=m, one_to_many_k=k)(
        out, targets)
    assert set(losses) == {f"{name}{s}" for name in ("loss_ce", "loss_bbox", "loss_giou")
                           for s in ("", "_0", "_1", "_2")}
    for suffix, layer, layer_targets, num_boxes in (
            ("_0", aux[0], repeated, 3 * k), ("_1", aux[1], repeated, 3 * k),
            ("_2", aux[2], targets, 3), ("", out, targets, 3)):
        expected = _brute_force_losses(layer, layer_targets, num_boxes)
        for name, v in expected.items():
            assert losses[name + suffix].item() == pytest.approx(v, rel=1e-10), name + suffix
    # One-to-many changes what the first layers learn and nothing else.
    plain = SetCriterion(4, HungarianMatcher())(out, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name + "_2"].item() == plain[name + "_2"].item()
        assert losses[name].item() == plain[name].item()
        assert losses[name + "_0"].item() != pytest.approx(plain[name + "_0"].item())


@pytest.mark.parametrize("layers, k, message", [
    (-1, 2, "one_to_many_layers must be at least 0"),
    (1, 0, "one_to_many_k must be at least 1"),
])
def test_criterion_rejects_bad_one_to_many_arguments(layers, k, message):
    with pytest.raises(ValueError, match=message):
        SetCriterion(4, HungarianMatcher(), one_to_many_layers=layers, one_to_many_k=k)


def test_criterion_one_to_many_needs_auxiliary_outputs():
    logits, boxes, targets, _ = _hand_case()
    with pytest.raises(ValueError, match="one-to-many matching of 2 decoder layers needs"):
        SetCriterion(4, HungarianMatcher(), one_to_many_layers=2)(
            {"pred_logits": logits, "pred_boxes": boxes}, targets)
