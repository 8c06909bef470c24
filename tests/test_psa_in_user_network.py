"""PSA as a timm layer in a network of the user's own: timm's activation conventions, a training
step, and fx tracing (plain torch.fx and timm's feature extraction)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import get_act_layer
from timm.models import create_feature_extractor
from timm_epsa.layers import PyramidSqueezeAttention, SEWeight, grouped_conv2d

ACTIVATIONS = ['gelu', 'silu', nn.GELU, nn.ReLU]


class UserNet(nn.Module):
    """Not an EPSANet: a conv stem, PSA where a 3x3 conv would be, BatchNorm, a linear head."""

    def __init__(self, act_layer):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.psa = PyramidSqueezeAttention(16, 32, stride=2, groups=(1, 2, 4, 8), reduction=4, act_layer=act_layer)
        self.norm = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.psa(self.stem(x))))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def x():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('act_layer', ACTIVATIONS)
def test_gate_uses_the_activation_given_as_timm_layers_take_it(act_layer):
    torch.manual_seed(0)
    se = SEWeight(8, reduction=2, act_layer=act_layer)
    assert type(se.act) is get_act_layer(act_layer)
    pooled = torch.randn(6, 8)
    activation = {'gelu': F.gelu, 'silu': F.silu, nn.GELU: F.gelu, nn.ReLU: F.relu}[act_layer]
    hidden = activation(F.linear(pooled, se.fc1.weight.flatten(1), se.fc1.bias))
    expected = torch.sigmoid(F.linear(hidden, se.fc2.weight.flatten(1), se.fc2.bias))
    torch.testing.assert_close(se(pooled), expected)


def test_no_activation_is_none():
    se = SEWeight(8, reduction=2, act_layer=None)
    assert isinstance(se.act, nn.Identity)


@pytest.mark.parametrize('act_layer, error, message', [
    ('gleu', ValueError, r"act_layer='gleu' is not an activation timm knows; pass a name timm\.layers\.get_act_layer"),
    (nn.GELU(), TypeError, r'act_layer=GELU\(.*\) is a module instance; pass its class or name'),
    # callables that make no activation module: used to fail inside timm's create_act_layer
    (nn.Linear, TypeError, r"act_layer=<class 'torch\.nn\.modules\.linear\.Linear'> does not build an activation "
                           r"module when called without arguments \((Linear\.)?__init__\(\) missing 2 required"),
    (torch.relu, TypeError, r'act_layer=<built-in method relu .*> does not build an activation module .*; pass '
                            r"a name timm knows \(e\.g\. 'relu', 'silu', 'gelu'\) or an nn\.Module class such as "
                            r'nn\.ReLU'),
    (lambda: F.relu, TypeError, r'act_layer=<function .*> does not build an activation module when called without '
                                r'arguments, it returns function'),
])
def test_unusable_activation_is_refused_in_one_line(act_layer, error, message):
    with pytest.raises(error, match=message):
        PyramidSqueezeAttention(64, 64, act_layer=act_layer)


@pytest.mark.parametrize('act_layer', ['gelu', 'silu', nn.GELU])
def test_user_network_trains_a_step(act_layer, x):
    torch.manual_seed(0)
    net = UserNet(act_layer)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert not torch.equal(p, before[name]), name


def test_user_network_traces_with_fx_and_timm_feature_extraction(x):
    net = UserNet('silu').eval()
    with torch.no_grad():
        expected = net(x)
        psa_out = net.psa(net.stem(x))

    traced = torch.fx.symbolic_trace(net)  # through the branches: their convolution stays one call
    assert sum(node.target is grouped_conv2d for node in traced.graph.nodes) == 4
    torch.testing.assert_close(traced(x), expected)

    # timm's extractor stops at the branch convolutions, as at its own Conv2d variants; the
    # softmax over the branches is a node of its own, so the attention weights can be read out.
    extractor = create_feature_extractor(net, return_nodes={'psa.softmax': 'attention', 'psa': 'psa'})
    leaves = {node.target for node in extractor.graph.nodes if node.op == 'call_module'}
    assert {f'psa.conv_{i}' for i in range(1, 5)} <= leaves
    with torch.no_grad():
        out = extractor(x)
    torch.testing.assert_close(out['psa'], psa_out)
    assert out['attention'].shape == (4, 4, 8, 1, 1)  # (batch, branches, branch channels, 1, 1)
    torch.testing.assert_close(out['attention'].sum(dim=1), torch.ones(4, 8, 1, 1))
