"""The timm model API on EPSANet. Wiring tests use one block per stage at 64 px."""
import re
import warnings

import pytest
import timm
import torch
from timm.models import create_feature_extractor
from torch import nn

import timm_epsa  # noqa: F401  registers the models

FEATURE_CHANNELS = [64, 256, 512, 1024, 2048]
FEATURE_REDUCTIONS = [2, 4, 8, 16, 32]


def tiny(name: str = 'epsanet50', **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, layers=(1, 1, 1, 1), **kwargs).eval()


@pytest.fixture(scope='module')
def model():
    return tiny()


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize('num_classes, expected', [(10, (2, 10)), (0, (2, 2048))])
def test_num_classes(x, num_classes, expected):
    assert tiny(num_classes=num_classes)(x).shape == expected


@pytest.mark.parametrize('in_chans', [1, 3, 4])
def test_in_chans(in_chans):
    model = tiny(in_chans=in_chans, num_classes=5)
    assert model.conv1.in_channels == in_chans
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize('pool, width', [('avg', 2048), ('max', 2048), ('avgmax', 2048), ('catavgmax', 4096)])
def test_global_pool(x, pool, width):
    model = tiny(global_pool=pool, num_classes=0)
    assert model(x).shape == (2, width)


def test_unpooled_features_after_reset_classifier(model, x):
    model = tiny()
    model.reset_classifier(0, '')
    assert model(x).shape == (2, 2048, 2, 2)


def test_reset_classifier(x):
    model = tiny()
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    assert model(x).shape == (2, 7)


def test_drop_rate_is_active_only_in_training(x):
    model = tiny(drop_rate=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


def test_drop_path_rate_schedules_stochastic_depth():
    model = timm.create_model('epsanet50', drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob if b.drop_path is not None else 0.0
             for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert rates == sorted(rates)


def _train_output(model: torch.nn.Module, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.train()(x)


def _without(model: torch.nn.Module, attribute: str, replacement) -> torch.nn.Module:
    """The same model, weights and all, with ``attribute`` of every block replaced."""
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            setattr(block, attribute, replacement)
    return model


@pytest.mark.parametrize('kwargs, attribute, replacement', [
    (dict(drop_path_rate=0.5), 'drop_path', None),
    (dict(drop_block_rate=0.5), 'drop_block', torch.nn.Identity()),
    (dict(block_args=dict(attn_layer='se')), 'se', None),
], ids=['drop_path', 'drop_block', 'attn_layer'])
def test_block_options_change_the_output(x, kwargs, attribute, replacement):
    """Each option timm's ResNet hands the block acts in its forward: taking its module out of every
    block changes the training-mode output, the same random draws and weights otherwise."""
    model = tiny(**kwargs)
    with_option = _train_output(model, x)
    torch.testing.assert_close(_train_output(model, x), with_option)  # the draws repeat with the seed
    assert not torch.allclose(_train_output(_without(model, attribute, replacement), x), with_option, atol=1e-4)


@pytest.mark.parametrize('output_stride, final_size', [(32, 2), (16, 4), (8, 8)])
def test_output_stride_dilates_psa(x, output_stride, final_size):
    model = tiny(output_stride=output_stride, num_classes=0)
    assert model.forward_features(x).shape == (2, 2048, final_size, final_size)
    psa = model.layer4[0].conv2
    dilation = {32: 1, 16: 1, 8: 2}[output_stride]  # first block of a stage keeps the previous dilation
    assert psa.conv_4.dilation == (dilation, dilation)
    assert psa.conv_4.padding == (4 * dilation, 4 * dilation)


@pytest.mark.parametrize('name', ['epsanet50', 'epsanet50_large'])
def test_features_only(name, x):
    model = tiny(name, features_only=True)
    assert model.feature_info.channels() == FEATURE_CHANNELS
    assert model.feature_info.reduction() == FEATURE_REDUCTIONS
    feats = model(x)
    assert [f.shape[1] for f in feats] == FEATURE_CHANNELS
    assert [64 // f.shape[-1] for f in feats] == FEATURE_REDUCTIONS


def test_features_only_out_indices_for_detection(x):
    model = tiny(features_only=True, out_indices=(1, 2, 3, 4))
    assert [f.shape[1:] for f in model(x)] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def test_forward_features_and_head(model, x):
    feats = model.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 2048)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    torch.testing.assert_close(model.fc(pre), model(x))


def test_forward_intermediates_match_features_only(model, x):
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    extractor = tiny(features_only=True)
    for a, b in zip(intermediates, extractor(x)):
        torch.testing.assert_close(a, b)


def test_grad_checkpointing_same_outputs_and_gradients(x):
    def run(checkpointing: bool):
        model = tiny()
        model.set_grad_checkpointing(checkpointing)
        out = model(x)
        out.square().mean().backward()
        return out, {n: p.grad for n, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    torch.testing.assert_close(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_torchscript(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated but still used by timm users
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_fx_trace_and_feature_extractor(model, x):
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    extractor = create_feature_extractor(model, return_nodes={'layer2': 'c3', 'layer4': 'c5'})
    out = extractor(x)
    assert out['c3'].shape == (2, 512, 8, 8) and out['c5'].shape == (2, 2048, 2, 2)


def test_meta_device_construction():
    model = timm.create_model('epsanet101_large', device='meta')
    assert {p.device.type for p in model.parameters()} == {'meta'}
    model = model.to_empty(device='cpu')
    assert model.layer3[0].conv2.conv_4.weight.device.type == 'cpu'


def test_channels_last_matches_contiguous(model, x):
    expected = model(x)
    cl_model = tiny().to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl_model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_on_cpu(model, x):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize('size', [(32, 32), (33, 33), (47, 61), (97, 40)])
def test_any_input_of_at_least_32px(model, size):
    out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_block_accepts_every_resnet_keyword(x):
    """Anti-aliasing, extra attention and DropBlock are wired where timm's Bottleneck has them,
    and extra block_args keep the variant's PSA schedule."""
    model = tiny('epsanet50_large', aa_layer=timm.layers.BlurPool2d, drop_block_rate=0.1, act_layer='silu',
                 block_reduce_first=2, block_args=dict(attn_layer='se'))
    block = model.layer2[0]
    assert block.conv2.conv_1.stride == (1, 1)
    assert isinstance(block.aa, timm.layers.BlurPool2d)
    assert isinstance(block.se, timm.layers.SEModule)
    assert isinstance(block.act1, torch.nn.SiLU)
    assert block.conv1.out_channels == block.conv2.conv_1.in_channels == 128  # 256 wide, reduce_first=2
    assert block.conv2.conv_1.groups == 32
    assert model(x).shape == (2, 1000)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_a_training_step_on_an_empty_batch_gives_zero_gradients(memory_format):
    """As timm's resnet50 does: no sample, no gradient (the own weight gradients of the grouped
    branches used to fail on B=0)."""
    model = tiny(num_classes=4).train().to(memory_format=memory_format)
    model(torch.randn(0, 3, 32, 32).contiguous(memory_format=memory_format)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(block='NoSuchBlock'), ValueError, "epsanet50 arguments: block='NoSuchBlock' is not a block class"),
    (dict(act_layer='nosuchact'), ValueError,
     "epsanet50 arguments: act_layer='nosuchact' is not an activation timm knows"),
    # each used to fail deep in ResNet, or to build another network than asked without a word
    (dict(act_layer=nn.GELU), TypeError, "act_layer=<class 'torch.nn.modules.activation.GELU'> does not build an "
                                         "activation module as ResNet builds it, act_layer(inplace=True)"),
    (dict(num_classes=-1), ValueError,
     'epsanet50 arguments: num_classes=-1 is out of range; pass an int of at least 0'),
    (dict(num_classes=2.5), TypeError, 'num_classes=2.5 is not a whole number'),
    (dict(in_chans=0), ValueError, 'in_chans=0 is out of range; pass an int of at least 1'),
    (dict(layers=(1, 1, 1)), ValueError, 'layers=(1, 1, 1) must give the blocks of each of the 4 stages'),
    (dict(layers=(1, 1, 1, 1, 1)), ValueError, 'layers=(1, 1, 1, 1, 1) must give the blocks of each of the 4 stages'),
    (dict(layers=(0, 1, 1, 1)), ValueError, 'layers=(0, 1, 1, 1) is out of range; pass ints of at least 1'),
    (dict(output_stride=7), ValueError, 'output_stride=7 is not one of 8, 16, 32'),
])
def test_arguments_epsanet_cannot_be_built_with_are_refused_naming_them(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        timm.create_model('epsanet50', **{'layers': (1, 1, 1, 1), 'device': 'meta', **kwargs})
