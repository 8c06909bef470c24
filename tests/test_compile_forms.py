"""Under torch.compile PSA takes the forms measured fastest with inductor, without graph breaks."""
import pytest
import torch
import torch.nn.functional as F

from timm_epsa.layers import PyramidSqueezeAttention


def compiled_conv_groups(module, x):
    """The ``groups`` of every convolution in the graph dynamo hands the backend (no compilation)."""
    seen = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == 'call_function' and node.target in (torch.conv2d, F.conv2d):
                seen.append(node.args[6] if len(node.args) > 6 else node.kwargs.get('groups', 1))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=backend, fullgraph=True)(x)
    return seen


@pytest.mark.slow
def test_compiled_psa_decomposes_branches_of_up_to_four_outputs_per_group():
    # stage 1 of epsanet50: 5x5 with 4 outputs per group, 7x7 with 2, 9x9 with 1
    psa = PyramidSqueezeAttention(64, 64).eval()
    x = torch.randn(1, 64, 12, 12)
    # the dense 3x3, then one depthwise conv per output-within-group: 4 for the 5x5, 2, 1
    assert compiled_conv_groups(psa, x) == [1] + [64] * 4 + [64] * 2 + [64]
    # eager keeps oneDNN's rule: the 5x5 stays a grouped convolution
    assert [c.as_depthwise for c in (psa.conv_2, psa.conv_3, psa.conv_4)] == [False, True, True]
