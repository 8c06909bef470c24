"""The fast PSA paths: same numbers as the plain grouped convolution and the naive reference, and
still exportable, scriptable and compilable."""
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import timm_epsa  # noqa: F401  registers the models
from naive_epsanet import NaivePSA
from numerics import assert_grads_close, assert_relative_close
from timm_epsa.layers import PyramidSqueezeAttention
from timm_epsa.layers import conv2d_with_fast_weight_grad, grouped_conv_as_depthwise, prefers_depthwise


@pytest.mark.parametrize('fast_conv', [grouped_conv_as_depthwise, conv2d_with_fast_weight_grad],
                         ids=['depthwise_decomposition', 'own_weight_gradient'])
@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4, 8]), in_per_group=st.integers(1, 5), out_per_group=st.integers(1, 5),
       kernel=st.sampled_from([1, 3, 5, 9]), stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
       size=st.integers(4, 15), seed=st.integers(0, 2 ** 16))
def test_fast_grouped_conv_equals_f_conv2d(fast_conv, groups, in_per_group, out_per_group, kernel, stride, dilation,
                                           size, seed):
    """Forward, input gradient and the hand-written weight gradients (depthwise over (channel, sample)
    pairs; grouped as a convolution of inputs with output gradients) for grouped, depthwise and dense
    shapes, odd sizes under stride 2 included, in both memory formats."""
    torch.manual_seed(seed)
    x = torch.randn(3, groups * in_per_group, size, size + 1)
    if seed % 2:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(groups * out_per_group, in_per_group, kernel, kernel, requires_grad=True)
    args = ([stride, stride], [dilation * (kernel - 1) // 2] * 2, [dilation, dilation])
    fast = fast_conv(x, w, groups, *args)
    ref = F.conv2d(x, w, None, *args, groups)
    assert_relative_close(fast, ref, msg='output')
    grad = torch.randn_like(ref)
    fast_grads = torch.autograd.grad(fast, (x, w), grad)
    ref_grads = torch.autograd.grad(ref, (x, w), grad)
    for name, a, b in zip(('input grad', 'weight grad'), fast_grads, ref_grads):
        assert_relative_close(a, b, msg=name)


def test_rule_picks_depthwise_for_the_slow_epsanet_branches():
    model = timm.create_model('epsanet50', device='meta')
    chosen = {
        (stage, conv.kernel_size[0])
        for stage in range(1, 5)
        for name, conv in getattr(model, f'layer{stage}')[1].conv2.named_children()
        if name.startswith('conv_') and conv.as_depthwise
    }
    # groups with one or two outputs each: stage 1 at 7x7 (2) and 9x9 (1), stage 2 at 9x9 (2)
    assert chosen == {(1, 7), (1, 9), (2, 9)}
    assert not prefers_depthwise(out_per_group=16, groups=1)


def test_grouped_branches_take_the_own_weight_gradient_in_nchw_only():
    """The route the measurements chose: grouped branches in NCHW; not channels_last, not the dense branch."""
    psa = PyramidSqueezeAttention(64, 64)  # conv_2: 5x5 with 4 groups of 4 outputs, a native grouped conv
    x = torch.randn(1, 64, 8, 8)
    own = '_Conv2dWithFastWeightGradBackward'
    assert type(psa.conv_2(x).grad_fn).__name__ == own
    assert type(psa.conv_2(x.to(memory_format=torch.channels_last)).grad_fn).__name__ != own
    assert type(psa.conv_1(x).grad_fn).__name__ != own
    with torch.no_grad():
        assert psa.conv_2(x).grad_fn is None


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_epsanet_stage1_psa_equals_naive_in_forward_and_backward(memory_format):
    """Stage 1 of epsanet50 in float32, where two branches take the depthwise path: output and
    gradients within 1e-5 relative of the naive reference."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(64, 64).to(memory_format=memory_format)
    naive = NaivePSA(64, 64)
    naive.load_state_dict(psa.state_dict())
    x = torch.randn(2, 64, 28, 28).to(memory_format=memory_format)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = psa(x_fast), naive(x_ref)
    assert_relative_close(out, ref, msg='output')
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_relative_close(x_fast.grad, x_ref.grad, msg='input grad')
    assert_grads_close({n: p.grad for n, p in psa.named_parameters()},
                       {n: p.grad for n, p in naive.named_parameters()})


def test_second_order_gradients_and_torch_func_equal_naive():
    """Double backward (gradient penalties) and ``torch.func.grad`` go through the layer's own weight
    gradients, both routes; in float64 they must equal the naive reference's."""
    torch.manual_seed(0)
    # NCHW, branch width 16: 5x5 with 4 groups of 4 outputs takes the grouped own-gradient route,
    # 7x7 and 9x9 (2 and 1 outputs per group) the depthwise one
    psa = PyramidSqueezeAttention(32, 64).double()
    naive = NaivePSA(32, 64).double()
    naive.load_state_dict(psa.state_dict())
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64)

    def penalty_grads(module):
        """Gradients of a penalty on the first-order gradients of the input and of every weight (as
        gradient penalties and MAML-style meta-learning take them)."""
        x_ = x.clone().requires_grad_()
        names, params = zip(*module.named_parameters())
        first = torch.autograd.grad(module(x_).square().sum(), [x_, *params], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        return dict(zip(('input', *names), torch.autograd.grad(penalty, [x_, *params])))

    assert_grads_close(penalty_grads(psa), penalty_grads(naive), rel=1e-10)

    def func_grads(module):
        params = dict(module.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,)).square().sum())(params)

    assert_grads_close(func_grads(psa), func_grads(naive), rel=1e-10)


def test_bf16_autocast_trains_the_layer_on_float32_input():
    """Under CPU autocast the branches run in bfloat16 on a float32 input; the gradients come back
    in float32 and agree with the naive reference to bfloat16 precision."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(64, 64)
    naive = NaivePSA(64, 64)
    naive.load_state_dict(psa.state_dict())
    x = torch.randn(2, 64, 14, 14)
    for module in (psa, naive):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = module(x)
        out.float().square().sum().backward()
    grads = {n: p.grad for n, p in psa.named_parameters()}
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert_grads_close(grads, {n: p.grad for n, p in naive.named_parameters()}, rel=2e-2)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_psa_output_keeps_the_input_memory_format(memory_format):
    """A channels_last network must stay channels_last through PSA (a stray NCHW output makes every
    later layer of the block convert)."""
    psa = PyramidSqueezeAttention(64, 64)
    x = torch.randn(2, 64, 12, 12).to(memory_format=memory_format)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert psa(x).is_contiguous(memory_format=memory_format)


@pytest.mark.slow
def test_onnx_export_matches_eager_in_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1)).eval()
    path = tmp_path / 'epsanet.onnx'
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), input_names=['x'], output_names=['logits'],
                      dynamic_shapes=({0: torch.export.Dim('batch')},))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 64, 64)  # another batch size than at export
    onnx_out = torch.from_numpy(session.run(None, {'x': x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(onnx_out, model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_without_graph_breaks():
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1)).eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
