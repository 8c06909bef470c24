"""The PSA layer against the naive reference written from the definition."""
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from naive_epsanet import NaivePSA, NaiveSEWeight
from numerics import assert_grads_close, assert_relative_close
from timm_epsa.layers import PyramidSqueezeAttention, SEWeight


@st.composite
def psa_configs(draw):
    num_branches = draw(st.integers(1, 4))
    branch_chs = draw(st.sampled_from([4, 8, 16]))
    in_chs = draw(st.sampled_from([4, 8, 12, 16, 24]))
    kernel_sizes = tuple(draw(st.sampled_from([1, 3, 5, 7, 9])) for _ in range(num_branches))
    common = [g for g in (1, 2, 4, 8, 16) if branch_chs % g == 0 and in_chs % g == 0]
    groups = tuple(draw(st.sampled_from(common)) for _ in range(num_branches))
    return dict(
        in_chs=in_chs,
        out_chs=branch_chs * num_branches,
        stride=draw(st.sampled_from([1, 2])),
        dilation=draw(st.sampled_from([1, 2])),
        kernel_sizes=kernel_sizes,
        groups=groups,
        reduction=draw(st.sampled_from([r for r in (1, 2, 4, 16) if branch_chs // r >= 1])),
    )


@settings(max_examples=60, deadline=None)
@given(cfg=psa_configs(), batch=st.integers(1, 3), height=st.integers(5, 19), width=st.integers(5, 19),
       channels_last=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_psa_matches_naive_reference_forward_and_backward(cfg, batch, height, width, channels_last, seed):
    """In float64, so that any difference is one of algorithm, not of float32 summation order."""
    torch.manual_seed(seed)
    psa = PyramidSqueezeAttention(**cfg).double()
    naive = NaivePSA(**cfg).double()
    naive.load_state_dict(psa.state_dict(), strict=True)  # same names as the official PSAModule

    x = torch.randn(batch, cfg['in_chs'], height, width, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x_psa, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = psa(x_psa), naive(x_naive)
    assert_relative_close(out, ref, rel=1e-12, msg='output')

    grad_out = torch.randn_like(ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert_relative_close(x_psa.grad, x_naive.grad, rel=1e-12, msg='input grad')
    assert_grads_close({n: p.grad for n, p in psa.named_parameters()},
                       {n: p.grad for n, p in naive.named_parameters()}, rel=1e-12)


def test_branches_are_concatenated_last_to_first():
    """Zeroing every branch but the 9x9 one must leave only the first quarter of channels non-zero."""
    psa = PyramidSqueezeAttention(16, 16, kernel_sizes=(3, 5, 7, 9), groups=(1, 1, 1, 1), reduction=1)
    with torch.no_grad():
        for i in (1, 2, 3):
            getattr(psa, f'conv_{i}').weight.zero_()
    out = psa(torch.randn(1, 16, 12, 12))
    assert out[:, :4].abs().sum() > 0
    assert out[:, 4:].abs().sum() == 0


def test_se_weight_gates_pooled_descriptors_like_the_official_module():
    """SEWeight takes what the official module computes after its pooling, (N, C, 1, 1), or the same
    flattened to (N, C), and returns the official gates in that shape."""
    torch.manual_seed(0)
    se = SEWeight(16, reduction=4)
    naive = NaiveSEWeight(16, reduction=4)
    naive.load_state_dict(se.state_dict())
    pooled = torch.randn(2, 16, 1, 1)
    expected = naive(pooled)
    torch.testing.assert_close(se(pooled), expected)
    torch.testing.assert_close(se(pooled.flatten(1)), expected.flatten(1))


def test_official_parameter_names_and_shapes():
    psa = PyramidSqueezeAttention(64, 64)
    shapes = {k: tuple(v.shape) for k, v in psa.state_dict().items()}
    assert shapes == {
        'conv_1.weight': (16, 64, 3, 3),
        'conv_2.weight': (16, 16, 5, 5),
        'conv_3.weight': (16, 8, 7, 7),
        'conv_4.weight': (16, 4, 9, 9),
        'se.fc1.weight': (1, 16, 1, 1),
        'se.fc1.bias': (1,),
        'se.fc2.weight': (16, 1, 1, 1),
        'se.fc2.bias': (16,),
    }


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(in_chs=64, out_chs=66), ValueError, 'out_chs=66 is not divisible by the 4 branches'),
    (dict(in_chs=64, out_chs=64, groups=(1, 4, 8, 32)), ValueError, 'groups=32 (kernel 9) must divide'),
    (dict(in_chs=60, out_chs=64, groups=(1, 4, 8, 16)), ValueError, 'in_chs=60'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(3, 5, 7)), ValueError, 'must be of the same length'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(3, 5, 7, 8)), ValueError, 'kernel size 8'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(), groups=()), ValueError,
     'kernel_sizes=() is empty; pass ints of at least 1, one odd kernel size per branch'),
    (dict(in_chs=64, out_chs=64, stride=0), ValueError, 'stride=0 is out of range; pass an int of at least 1'),
    (dict(in_chs=64, out_chs=64, reduction=32), ValueError, 'leaves no hidden channel; use a reduction from 1 to 16'),
    (dict(in_chs=64, out_chs=64, reduction=0), ValueError,
     'SEWeight: reduction=0 is out of range; pass an int of at least 1'),
    # sizes of zero or less: PSA(0, 64) used to build a layer that outputs zeros
    (dict(in_chs=0, out_chs=64), ValueError,
     'PyramidSqueezeAttention: in_chs=0 is out of range; pass an int of at least 1'),
    (dict(in_chs=64, out_chs=-64), ValueError, 'out_chs=-64 is out of range; pass an int of at least 1'),
    # values of the wrong kind: each used to fail inside torch, or (True) to be taken as 1
    (dict(in_chs=64, out_chs=64, stride=(2, 2)), TypeError,
     'PyramidSqueezeAttention: stride=(2, 2) is not a whole number; pass an int of at least 1'),
    (dict(in_chs=64, out_chs=64, stride=True), TypeError, 'stride=True is not a whole number'),
    (dict(in_chs=64.0, out_chs=64), TypeError, 'in_chs=64.0 is not a whole number'),
    (dict(in_chs=64, out_chs=64, kernel_sizes=3), TypeError,
     'kernel_sizes=3 is not a list or tuple of whole numbers; pass ints of at least 1, one odd kernel size per branch'),
    (dict(in_chs=64, out_chs=64, groups='1248'), TypeError, "groups='1248' is not a list or tuple of whole numbers"),
    (dict(in_chs=64, out_chs=64, kernel_sizes=(3., 5, 7, 9)), TypeError,
     'kernel_sizes=(3.0, 5, 7, 9) holds 3.0, which is not a whole number'),
    (dict(in_chs=64, out_chs=64, reduction=None), TypeError, 'SEWeight: reduction=None is not a whole number'),
])
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        PyramidSqueezeAttention(**kwargs)


def test_integers_of_other_types_are_taken_as_ints():
    """numpy's integers (a config read with numpy, a shape) are whole numbers as Python indexes them."""
    psa = PyramidSqueezeAttention(np.int64(32), np.int64(32), stride=np.int64(2), kernel_sizes=[3, np.int64(5)],
                                  groups=(1, 2), reduction=np.int64(4))
    assert type(psa.conv_2.stride[0]) is int and psa.conv_2.kernel_size == (5, 5) and psa.se.fc1.out_channels == 4
    assert psa(torch.randn(1, 32, 8, 8)).shape == (1, 32, 4, 4)


@pytest.mark.parametrize('shape, message', [
    ((16, 8, 8), 'the input of shape [16, 8, 8] has no batch dimension; pass (batch, 16, height, width), '
                 'e.g. x.unsqueeze(0) for a single image'),
    ((1, 16, 8, 8, 1), 'the input of shape [1, 16, 8, 8, 1] is not (batch, 16, height, width)'),
    ((2, 8, 8, 8), 'the input of shape [2, 8, 8, 8] has 8 channels, the layer was built for in_chs=16'),
])
def test_input_that_is_not_a_batch_of_in_chs_images_is_refused_in_one_line(shape, message):
    """Unbatched input used to fail deep inside a group sum (`unflatten: Provided sizes ...`)."""
    psa = PyramidSqueezeAttention(16, 32, groups=(1, 2, 4, 8), reduction=4)
    for layer in (psa, torch.jit.script(psa), torch.fx.symbolic_trace(psa)):
        with pytest.raises((ValueError, torch.jit.Error), match=re.escape(message)):
            layer(torch.randn(*shape))


def test_factory_kwargs_build_on_meta_device():
    psa = PyramidSqueezeAttention(32, 32, kernel_sizes=(3, 5), groups=(1, 2), device='meta', dtype=torch.bfloat16)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in psa.parameters())
