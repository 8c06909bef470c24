"""segmentation_models_pytorch with an EPSANet encoder (``encoder_name='tu-epsanet50'``): forward and a
training step for Unet, FPN and DeepLabV3Plus at output stride 16 and 8.

Nothing here imports timm_epsa: smp finds ``epsanet50`` in timm's registry, where the start-up hook
put it (run this file alone to see that hold; in the whole suite other files import the package).
smp passes extra keyword arguments on to ``timm.create_model``, so ``layers=(1, 1, 2, 2)`` keeps the
encoder small while the dilated stages still have a block after their first.
"""
import pytest
import torch
import torch.nn.functional as F

smp = pytest.importorskip('segmentation_models_pytorch')

CLASSES = 3
SIZE = 64


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread, as hub_stub.one_thread (not imported here: hub_stub imports timm_epsa)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _psa_layers(model):
    return [m for m in model.encoder.modules() if type(m).__name__ == 'PyramidSqueezeAttention']


@pytest.mark.parametrize('architecture, kwargs, output_stride', [
    ('Unet', {}, 32),
    ('FPN', {}, 32),
    ('DeepLabV3Plus', dict(encoder_output_stride=16), 16),
    ('DeepLabV3Plus', dict(encoder_output_stride=8), 8),
])
def test_epsanet_encoder_forward_and_training_step(architecture, kwargs, output_stride):
    torch.manual_seed(0)
    model = getattr(smp, architecture)(
        encoder_name='tu-epsanet50', encoder_weights=None, classes=CLASSES, layers=(1, 1, 2, 2), **kwargs)
    psa = _psa_layers(model)
    assert len(psa) == 6  # timm got the layers argument
    # Stages past the output stride keep the resolution: their first PSA layer does not stride and
    # the next ones dilate every branch, as timm's ResNet does with its 3x3 convolutions.
    strides = [layer.conv_4.stride[0] for layer in psa]
    dilations = [layer.conv_4.dilation[0] for layer in psa]
    assert strides == {32: [1, 2, 2, 1, 2, 1], 16: [1, 2, 2, 1, 1, 1], 8: [1, 2, 1, 1, 1, 1]}[output_stride]
    assert dilations == {32: [1, 1, 1, 1, 1, 1], 16: [1, 1, 1, 1, 1, 2], 8: [1, 1, 1, 2, 2, 4]}[output_stride]

    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    features = model.encoder(x)
    assert features[-1].shape == (2, 2048, SIZE // output_stride, SIZE // output_stride)

    target = torch.randint(0, CLASSES, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(x)
    assert logits.shape == (2, CLASSES, SIZE, SIZE)
    loss = F.cross_entropy(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    for layer in psa:
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    before = psa[0].conv_1.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(psa[0].conv_1.weight, before)

    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
