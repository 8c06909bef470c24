"""The four registered variants: sizes against the figures in the docs, init, official checkpoints."""
import math
import re

import pytest
import safetensors.torch
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_epsa  # noqa: F401  registers the models
from timm_epsa.hub.checkpoint import CheckpointMismatchError
from naive_epsanet import NaiveEPSANet, randomize_batchnorm_

# (params, MACs at 224x224 counted by torch.utils.flop_counter, paper's params in M or None)
SIZES = {
    'epsanet50': (22_561_715, 3_597_900_160, 22.56),
    'epsanet101': (38_900_279, 6_788_125_056, 38.90),
    'epsanet50_large': (30_100_094, 5_052_720_640, None),  # paper's table: 27.90M, see README
    'epsanet101_large': (53_742_470, 9_665_840_640, None),  # paper's table: 49.59M
}


def test_registered_with_timm_claiming_no_weights():
    """No EPSANet weights exist: the tags carry the metadata, but timm lists none as pretrained
    (with TIMM_EPSA_HUB_NAMESPACE set they are, see test_hub.py)."""
    assert set(timm.list_models('epsanet*')) == set(SIZES)
    assert set(timm.list_models('epsanet*', include_tags=True)) == {f'{name}.in1k' for name in SIZES}
    assert timm.list_pretrained('epsanet*') == []
    assert timm.list_models('epsanet*', pretrained=True) == []
    cfg = timm.models.get_pretrained_cfg('epsanet50.in1k')
    assert not cfg.has_weights
    assert (cfg.paper_ids, cfg.license, cfg.crop_pct, cfg.interpolation) == \
        ('arXiv:2105.14447', 'apache-2.0', 0.875, 'bilinear')


@pytest.mark.parametrize('name', list(SIZES))
def test_params_and_macs_exact(name):
    params, macs, paper_params = SIZES[name]
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == params
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(1, 3, 224, 224, device='meta'))
    assert counter.get_total_flops() // 2 == macs
    if paper_params is not None:
        assert round(params / 1e6, 2) == paper_params


def test_small_and_large_match_naive_networks_key_for_key():
    """Same keys and shapes as the naive networks built from the definition, so the block layout
    (widths, downsample, SE width) is right, not just the totals written down above."""
    large_psa = dict(kernel_sizes=(3, 5, 7, 9), groups=(32, 32, 32, 32))
    for name, naive in [
        ('epsanet50', NaiveEPSANet((3, 4, 6, 3))),
        ('epsanet50_large', NaiveEPSANet((3, 4, 6, 3), width_mult=2, psa_kwargs=large_psa)),
    ]:
        ours = timm.create_model(name, device='meta')
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in naive.state_dict().items()}


def test_init_follows_official_code():
    """Convs (SE included) ~ N(0, sqrt(2 / (k*k*out))); SE biases and fc keep PyTorch defaults;
    BN weight 1, bias 0; the last BN is not zeroed (the official code does not)."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50')
    psa = model.layer3[0].conv2
    for conv in (psa.conv_1, psa.conv_4):
        k, out = conv.kernel_size[0], conv.out_channels
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (k * k * out)), rel=0.05)
    assert psa.se.fc1.bias.abs().max() > 0
    assert torch.all(model.layer1[0].bn3.weight == 1)
    assert torch.all(model.layer1[0].bn3.bias == 0)
    zeroed = timm.create_model('epsanet50', layers=(1, 1, 1, 1), zero_init_last=True)
    assert torch.all(zeroed.layer1[0].bn3.weight == 0)


def _official_checkpoint(naive: torch.nn.Module, path):
    """What the official main.py writes: DataParallel-prefixed state dict plus training state."""
    optimizer = torch.optim.SGD(naive.parameters(), lr=1e-6, momentum=0.9)
    naive(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    torch.save({
        'epoch': 120,
        'state_dict': {f'module.{k}': v for k, v in naive.state_dict().items()},
        'best_prec1': torch.tensor(77.49),
        'optimizer': optimizer.state_dict(),
    }, path)


def test_official_checkpoint_loads_strictly_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    naive = NaiveEPSANet((3, 4, 6, 3))
    randomize_batchnorm_(naive)
    path = tmp_path / 'model_best.pth.tar'
    _official_checkpoint(naive, path)
    naive.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = naive(x)

    via_checkpoint = timm.create_model('epsanet50', checkpoint_path=str(path)).eval()
    via_file = timm.create_model(
        'epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    # a checkpoint object handed over as is reaches the model only through checkpoint_filter_fn
    via_object = timm.create_model(
        'epsanet50', pretrained=True, pretrained_cfg_overlay=dict(state_dict=torch.load(path))).eval()
    with torch.no_grad():
        for model in (via_checkpoint, via_file, via_object):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs', [{}, dict(num_classes=10), dict(features_only=True)],
                         ids=['strict', 'new-classifier', 'features-only'])
def test_checkpoint_for_another_architecture_is_refused(tmp_path, resnet50_state_dict, kwargs):
    """Refused by the filter with the differing tensors, also where timm drops the classifier and
    loads non-strictly (and would otherwise half-load a foreign backbone without a word)."""
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': resnet50_state_dict}, path)
    with pytest.raises(CheckpointMismatchError, match=(
            rf'{re.escape(str(path))} does not fit epsanet50: .*missing: layer1\.0\.conv2\.conv_1\.weight .*'
            r'unexpected: layer1\.0\.conv2\.weight \(64, 64, 3, 3\)')):
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.fixture
def tuned(tmp_path):
    """(model, file): a fine-tuned model (10 classes) and its weights file."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10).eval()
    path = tmp_path / 'tuned.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    return model, path


def test_a_classifier_of_another_size_is_named_with_the_fix(tuned):
    """timm keeps the classifier when the model has the class count of the weights' cfg (1000 here):
    the weights' 10 classes are then refused in one sentence saying what to pass, not in torch's words."""
    model, path = tuned
    with pytest.raises(CheckpointMismatchError, match=(
            r'their classifier fc\.weight \(10, 2048\) is for 10 classes, the model has \(1000, 2048\): to keep it, '
            r'pass num_classes=10; for a new classifier of another size, pass num_classes=<that size>')):
        timm.create_model('epsanet50', layers=(1, 1, 1, 1), pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    new = timm.create_model('epsanet50', layers=(1, 1, 1, 1), pretrained=True, num_classes=5,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert new.fc.weight.shape == (5, 2048) and torch.equal(new.conv1.weight, model.conv1.weight)


@pytest.mark.parametrize('overlay', [{}, dict(num_classes=10)], ids=['cfg-says-1000', 'cfg-says-10'])
def test_a_classifier_of_the_requested_size_is_kept(tuned, overlay):
    """num_classes=10 with a 10-class file: its classifier is the one asked for, kept also where the
    cfg says 1000 classes (timm's rule would drop it for a random one without a word)."""
    model, path = tuned
    kept = timm.create_model('epsanet50', layers=(1, 1, 1, 1), pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(path), **overlay)).eval()
    assert torch.equal(kept.fc.weight, model.fc.weight) and torch.equal(kept.fc.bias, model.fc.bias)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x), rtol=0, atol=0)


def test_backbone_weights_of_a_model_with_other_classes_load_for_features(tuned):
    """A fine-tuned model's file (10 classes) serves as the backbone of a detector or segmenter
    (features_only), with no class count given: timm drops its classifier."""
    tuned, path = tuned
    backbone = timm.create_model(
        'epsanet50', layers=(1, 1, 1, 1), features_only=True, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], tuned.forward_features(x))
