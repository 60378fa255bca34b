"""Without autograd the encoder layers and MSDeformAttn work in place (the sampling
locations as one in-place product, residuals, ReLU, padding fill); with a graph they do not.
Both compute the same function: checked in float64 against each other and the float32 no-grad
path against float64."""
import pytest
import torch

from deformable_detr.modeling.deformable_encoder import (
    DeformableTransformerEncoderLayer,
    encoder_reference_points,
)

SHAPES = [(6, 7), (3, 4), (2, 2)]


def inputs(dtype, generator):
    s = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, s, 32, generator=generator, dtype=dtype)
    pos = torch.randn(2, s, 32, generator=generator, dtype=dtype)
    valid = torch.tensor([[[1.0, 1.0]] * 3, [[0.8, 0.7]] * 3], dtype=dtype)
    ref = encoder_reference_points(SHAPES, valid).to(dtype)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    start = torch.tensor([0, 42, 54], dtype=torch.int64)
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[1, ::5] = True
    return src, pos, ref, shapes, start, mask


@pytest.mark.parametrize("attn_impl", ["compiled", "pytorch"])
def test_encoder_layer_same_with_and_without_graph(attn_impl):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = DeformableTransformerEncoderLayer(32, 64, 0.0, 3, 4, 2, attn_impl=attn_impl).eval()
    with torch.no_grad():  # offsets large enough to move points across pixels and borders
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.5, generator=g)
    args = inputs(torch.float64, g)
    kwargs = {"spatial_shapes_list": SHAPES}
    with torch.no_grad():
        no_graph = layer.double()(*args[:5], args[5], **kwargs)
    src = args[0].clone().requires_grad_()
    with_graph = layer(src, *args[1:5], args[5], **kwargs)
    torch.testing.assert_close(no_graph, with_graph.detach(), rtol=1e-12, atol=1e-12)
    with_graph.sum().backward()  # the graph path is differentiable end to end
    assert torch.isfinite(src.grad).all()

    # float32 without a graph against float64.
    with torch.no_grad():
        single = layer.float()(*[a.float() if a.is_floating_point() else a for a in args[:5]],
                               args[5], **kwargs)
    torch.testing.assert_close(single.double(), no_graph, rtol=1e-4, atol=1e-4)
