"""Frozen batch norms folded into the convolutions: the same function and gradients as
detectron2's Conv2d followed by FrozenBatchNorm2d, with the same parameters and keys."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm

from deformable_detr.modeling.frozen_bn_folding import Conv2dFoldedFrozenBN, fold_frozen_batchnorm


def frozen_conv(bias: bool, generator) -> Conv2d:
    conv = Conv2d(6, 5, kernel_size=3, padding=1, stride=2, bias=bias,
                  norm=FrozenBatchNorm2d(5), activation=F.relu).double()
    with torch.no_grad():
        for t in (conv.weight, conv.norm.weight, conv.norm.bias, conv.norm.running_mean):
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float64))
        conv.norm.running_var.copy_(0.5 + torch.rand(5, generator=generator,
                                                     dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(5, generator=generator, dtype=torch.float64))
    return conv


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_folded_conv_matches_conv_then_frozen_norm(bias, training):
    g = torch.Generator().manual_seed(0)
    reference = frozen_conv(bias, g)
    folded = fold_frozen_batchnorm(copy.deepcopy(reference))
    assert type(folded) is Conv2dFoldedFrozenBN
    assert folded.state_dict().keys() == reference.state_dict().keys()
    reference.train(training)
    folded.train(training)
    x = torch.randn(2, 6, 9, 11, generator=g, dtype=torch.float64, requires_grad=training)
    x2 = x.detach().clone().requires_grad_(training)
    expected, got = reference(x), folded(x2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if training:
        grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
        expected.backward(grad)
        got.backward(grad)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(folded.weight.grad, reference.weight.grad,
                                   rtol=1e-12, atol=1e-12)
        assert folded.norm.weight.grad is None  # frozen: buffers, not parameters


def test_fold_leaves_trainable_norms_and_keeps_channels_last():
    trainable = Conv2d(3, 4, kernel_size=1, bias=False, norm=get_norm("BN", 4))
    fold_frozen_batchnorm(trainable)
    assert type(trainable) is Conv2d
    frozen = frozen_conv(False, torch.Generator().manual_seed(1)).to(
        memory_format=torch.channels_last)
    weight, _ = fold_frozen_batchnorm(frozen).folded_weight_and_bias()
    assert weight.is_contiguous(memory_format=torch.channels_last)
