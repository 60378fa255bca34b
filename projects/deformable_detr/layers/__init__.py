from .dropout import Dropout, fused_dropout, has_fused_dropout
from .ms_deform_attn import ATTN_IMPLS, MSDeformAttn
from .ms_deform_attn_op import (
    check_inputs,
    has_compiled_op,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

__all__ = [
    "ATTN_IMPLS",
    "Dropout",
    "MSDeformAttn",
    "check_inputs",
    "fused_dropout",
    "has_fused_dropout",
    "has_compiled_op",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
]
