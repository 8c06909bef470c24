"""Deployment: every exact rewrite against the unmodified eager model in float64, the forms chosen per
runtime, export round trips through ONNX Runtime and OpenVINO, and the errors a user can meet."""
import copy
import importlib
import re

import pytest
import timm
import torch
from torch import nn

from numerics import assert_relative_close
from timm_epsa.deploy import (
    DEPLOY_EXTRA, RUNTIMES, TOLERANCE, BranchForm, ExportCheckError, ExportError, MissingRuntimeError, PSAGraph,
    branch_form, export_model, load_runner, require_runtime, rewrite_for_runtime)
from timm_epsa.deploy import graph_export as export_module
from timm_epsa.deploy.rewrite import rewrite_psa
from timm_epsa.deploy.tracing import TRACE_BATCH
from timm_epsa.layers import PyramidSqueezeAttention

pytestmark = pytest.mark.usefixtures('untimed_tuning')

EXACT = 1e-12  # float64: only summation order differs


def randomise_norms(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine terms away from their initial 0/1, so a fold has something to fold."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model


def tiny(variant: str = 'epsanet50', **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_norms(timm.create_model(variant, layers=(1, 1, 1, 1), **kwargs))


def psa_forms(psa: PyramidSqueezeAttention):
    """Every form each branch of ``psa`` can take, applied to all branches at once."""
    convs = [conv for name, conv in psa.named_children() if name.startswith('conv_')]
    yield 'own groups', [BranchForm() for _ in convs]
    yield 'dense', [BranchForm(groups=1) for _ in convs]
    yield 'half the groups', [BranchForm(groups=max(1, conv.groups // 2)) for conv in convs]
    yield 'depthwise, sums reduced', [BranchForm(depthwise=True) for _ in convs]
    yield 'depthwise, sums as conv', [BranchForm(depthwise=True, sums_as_conv=True) for _ in convs]


@pytest.mark.parametrize('keep_order', [True, False])
@pytest.mark.parametrize('fold', [True, False])
def test_every_form_of_psa_is_exact(keep_order, fold):
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, 64, stride=2, kernel_sizes=(3, 5, 7, 9), groups=(1, 2, 4, 8)).double().eval()
    norm = randomise_norms(nn.BatchNorm2d(64).double()).eval()
    x = torch.randn(2, 32, 15, 15, dtype=torch.float64)
    with torch.no_grad():
        expected = norm(psa(x)) if fold else psa(x)
        for label, forms in psa_forms(psa):
            graph = PSAGraph(psa, forms, norm=norm if fold else None, keep_order=keep_order)
            actual = graph(x)
            assert_relative_close(actual, expected[:, graph.out_order], rel=EXACT, msg=label)
            if keep_order:
                assert graph.out_order == list(range(64)), label


@pytest.mark.parametrize('runtime', RUNTIMES)
@pytest.mark.parametrize('variant', ['epsanet50', 'epsanet50_large'])
def test_rewrite_computes_the_eager_model_and_leaves_it_untouched(runtime, variant):
    model = tiny(variant, num_classes=7, in_chans=2).double()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, 48, 48, dtype=torch.float64)
    graph = rewrite_for_runtime(model, runtime)
    assert model.training and not graph.training
    assert not any(isinstance(m, PyramidSqueezeAttention) for m in graph.modules())
    with torch.no_grad():
        assert_relative_close(graph(x), model.eval()(x), rel=EXACT)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bn_after_psa_is_folded_and_branch_orders_reach_conv3():
    model = tiny().eval()
    graph = rewrite_for_runtime(model, 'onnxruntime')
    block = graph.layer1[0]
    assert isinstance(block.bn2, nn.Identity) and block.conv2.folded
    assert block.conv2.reordered  # stage 1's depthwise branches leave their own order to conv3
    assert not torch.equal(block.conv3.weight, model.layer1[0].conv3.weight)


def test_zero_bn_scale_folds_exactly():
    """A BN weight of zero (a pruned channel) must not break the fold, as a fold into the SE would."""
    model = tiny().double().eval()
    model.layer2[0].bn2.weight.data[::3] = 0
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_relative_close(rewrite_for_runtime(model, 'openvino')(x), model(x), rel=EXACT)


def test_psa_outside_an_epsa_block_keeps_its_output_order():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3), PyramidSqueezeAttention(64, 64), nn.Conv2d(64, 8, 1)).double().eval()
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    for runtime in RUNTIMES:
        graph = rewrite_for_runtime(net, runtime)
        assert isinstance(graph[1], PSAGraph) and not graph[1].reordered
        with torch.no_grad():
            assert_relative_close(graph(x), net(x), rel=EXACT)
    layer = net[1]
    assert isinstance(rewrite_for_runtime(layer, 'openvino'), PSAGraph)


def test_block_with_another_norm_keeps_order_and_norm():
    model = tiny(norm_layer=lambda c, **kw: nn.GroupNorm(1, c, **kw)).double().eval()
    graph = rewrite_for_runtime(model, 'onnxruntime')
    assert isinstance(graph.layer1[0].bn2, nn.GroupNorm) and not graph.layer1[0].conv2.reordered
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_relative_close(graph(x), model(x), rel=EXACT)


def branch_forms(runtime: str, variant: str, precision: str = 'fp32'):
    model = timm.create_model(variant, device='meta')
    return {
        (stage, conv.kernel_size[0]): branch_form(runtime, conv, precision)
        for stage in range(1, 5)
        for name, conv in getattr(model, f'layer{stage}')[1].conv2.named_children() if name.startswith('conv_')
    }


def test_onnxruntime_keeps_grouped_convs_only_in_whole_channel_blocks():
    forms = branch_forms('onnxruntime', 'epsanet50')
    native = {key for key, form in forms.items() if not form.depthwise}
    # 16 inputs and outputs per group or more: stage 3 5x5 (64/16), stage 4 5x5 and 7x7; the dense 3x3s
    assert native == {(s, 3) for s in range(1, 5)} | {(3, 5), (4, 5), (4, 7)}
    assert all(form.groups is None and not form.sums_as_conv for form in forms.values())


def test_openvino_forms_follow_the_measured_throughputs():
    forms = branch_forms('openvino', 'epsanet50')
    assert {key for key, form in forms.items() if form.depthwise} == {(1, 5), (1, 7), (1, 9), (2, 7), (2, 9), (3, 9)}
    assert all(form.sums_as_conv for form in forms.values() if form.depthwise)
    # 8 outputs per group: block-diagonal weights with 16
    assert forms[2, 5].groups == 2 and forms[3, 7].groups == 4 and forms[4, 9].groups == 8
    assert forms[3, 5] == forms[4, 7] == BranchForm()


@pytest.mark.parametrize('runtime, precision', [('openvino', 'bf16'), ('openvino', 'int8'), ('onnxruntime', 'int8')])
def test_bf16_and_int8_rules_make_groups_of_16_outputs(runtime, precision):
    forms = branch_forms(runtime, 'epsanet50', precision)
    assert all(form == BranchForm() for (stage, kernel), form in forms.items() if kernel == 3)
    # stage 1: 16 outputs per branch, so one group; stage 2: 32, two groups; stage 4: kept, or groups of 16
    assert forms[1, 5] == forms[1, 7] == BranchForm(groups=1)
    assert forms[2, 5] == forms[2, 7] == BranchForm(groups=2) and forms[3, 7] == forms[3, 9] == BranchForm(groups=4)
    assert forms[3, 5] == forms[4, 5] == forms[4, 7] == BranchForm() and forms[4, 9] == BranchForm(groups=8)
    # ONNX Runtime's int8 depthwise kernel beats a 9x9 of one or two outputs per group made dense
    nine = BranchForm(depthwise=True, sums_as_conv=True) if runtime == 'onnxruntime' else None
    assert forms[1, 9] == (nine or BranchForm(groups=1)) and forms[2, 9] == (nine or BranchForm(groups=2))
    with pytest.raises(ValueError, match='no bf16 rule'):
        branch_form('onnxruntime', nn.Conv2d(8, 8, 3, groups=4), 'bf16')


@pytest.mark.slow
@pytest.mark.parametrize('runtime, name', [('onnxruntime', 'model.onnx'), ('openvino', 'model.xml')])
def test_export_round_trip_with_dynamic_batch(runtime, name, tmp_path):
    pytest.importorskip(runtime)
    model = tiny(num_classes=10)
    report = export_model(model, tmp_path / name, runtime, img_size=64)
    assert report.batch_size is None and report.max_error <= 1e-4
    assert TRACE_BATCH not in report.checked_batch_sizes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in report.files)
    run = load_runner(runtime, tmp_path / name)
    x = torch.randn(5, 3, 64, 64)  # yet another batch size
    with torch.no_grad():
        assert_relative_close(torch.from_numpy(run(x.numpy())), model.eval()(x), rel=1e-4)
    if runtime == 'openvino':
        assert 'f16' not in (tmp_path / name).read_text()  # weights and compute kept in fp32


@pytest.mark.slow
def test_export_with_fixed_batch(tmp_path):
    pytest.importorskip('onnx')
    import onnx
    net = nn.Sequential(nn.Conv2d(3, 32, 1), PyramidSqueezeAttention(32, 64, groups=(1, 2, 4, 8))).eval()
    report = export_model(net, tmp_path / 'psa.onnx', 'onnxruntime', batch_size=4, img_size=16)
    assert report.checked_batch_sizes == (4,)
    dims = onnx.load(str(tmp_path / 'psa.onnx')).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 16, 16]


@pytest.mark.slow
@pytest.mark.parametrize('tuned_over_rules, exported', [(1.2, 'rules'), (0.9, 'tuned')])
def test_export_keeps_the_tuned_forms_only_where_the_whole_model_is_not_slower(
        tmp_path, monkeypatch, untimed_tuning, tuned_over_rules, exported):
    """Stand-ins: every branch candidate beats the rule's form alone, the whole model takes
    ``tuned_over_rules`` of the rules' time; the file is written in the forms that win the whole model."""
    pytest.importorskip('onnxruntime')
    net = nn.Sequential(nn.Conv2d(3, 32, 1), PyramidSqueezeAttention(32, 64, groups=(1, 2, 4, 8))).eval()
    untimed_tuning.rules_fastest, untimed_tuning.tuned_over_rules = False, tuned_over_rules
    written = []
    monkeypatch.setattr(export_module, 'rewrite_psa', lambda model, form_of: written.append(
        {f'1.{name}': form_of(f'1.{name}', conv) for name, conv in model[1].named_children()
         if name.startswith('conv_')}) or rewrite_psa(model, form_of))
    export_model(net, tmp_path / 'psa.onnx', 'onnxruntime', batch_size=4, img_size=16)
    [compared] = untimed_tuning.whole_models
    assert compared['tuned'] != compared['rules'] and len(compared['rules']) == 4
    assert written == [compared[exported]]


@pytest.mark.slow
def test_failed_check_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip('onnxruntime')
    net = nn.Sequential(nn.Conv2d(3, 32, 1), PyramidSqueezeAttention(32, 64, groups=(1, 2, 4, 8))).eval()

    def broken_rewrite(model, form_of):
        graph = rewrite_psa(model, form_of)
        graph[1].branches[-1].weight.data.mul_(1.01)  # the 3x3 branch off by 1%: the check must catch it
        return graph

    monkeypatch.setattr(export_module, 'rewrite_psa', broken_rewrite)
    with pytest.raises(ExportCheckError) as error:
        export_model(net, tmp_path / 'psa.onnx', 'onnxruntime', img_size=16)
    assert '\n' not in str(error.value) and 'differs from eager PyTorch' in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_output_error_is_relative_to_each_samples_spread():
    """One dominant logit hid an error of 6% of a typical logit under the error relative to the largest
    output (6e-9); many equal outputs (ReLU's zeros), one output or all zero do not make it divide by 0."""
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 1e7
    wrong = logits.clone()
    wrong[1, :500] += 0.06
    assert float((wrong - logits).abs().max() / logits.abs().max()) < TOLERANCE  # the old measure passed it
    assert export_module.output_error(logits, wrong) > 0.05
    assert export_module.output_error(logits, logits) == 0
    features = torch.relu(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)))
    error = export_module.output_error
    assert error(features, features + 1e-7) < TOLERANCE < error(features, features + 1e-3)
    assert export_module.output_error(torch.tensor([[3.]]), torch.tensor([[3.0003]])) == pytest.approx(1e-4, rel=1e-3)
    assert export_module.output_error(torch.zeros(2, 5), torch.zeros(2, 5)) == 0
    assert torch.isnan(torch.tensor(export_module.output_error(logits, wrong * torch.nan)))


@pytest.mark.slow
def test_a_wrong_branch_cannot_hide_under_a_dominant_logit(tmp_path, monkeypatch):
    """A PSA branch 50% off, built on the real rewrite, in a classifier whose bias makes one logit 1e7:
    relative to the largest output the runtime's error was 5e-10 and the export passed its check."""
    pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 1), PyramidSqueezeAttention(32, 64, groups=(1, 2, 4, 8)),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 100)).eval()
    net[-1].bias.data[7] = 1e7

    def broken_rewrite(model, form_of):
        graph = rewrite_psa(model, form_of)
        graph[1].branches[-1].weight.data.mul_(1.5)
        return graph

    monkeypatch.setattr(export_module, 'rewrite_psa', broken_rewrite)
    with pytest.raises(ExportCheckError, match="onnxruntime output differs from eager PyTorch by .* of the outputs' "
                                               "spread at batch 1, more than 1e-04: export removed"):
        export_model(net, tmp_path / 'net.onnx', 'onnxruntime', img_size=16, tune=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_outputs_equal_for_every_input_are_checked_on_the_features_before_them(tmp_path, monkeypatch):
    """A classifier of zero weights gives the same logits whatever the layers before it compute: the
    runtime matched them at 0.0 'of the outputs' spread' with any graph, this wrong one too."""
    pytest.importorskip('onnxruntime')
    model = tiny(num_classes=10)
    nn.init.zeros_(model.fc.weight)
    nn.init.zeros_(model.fc.bias)

    def broken_rewrite(graph_model, form_of):
        graph = rewrite_psa(graph_model, form_of)
        graph.layer4[0].conv3.weight.data.mul_(1.01)  # a layer before the classifier off by 1%
        return graph

    monkeypatch.setattr(export_module, 'rewrite_psa', broken_rewrite)
    with pytest.raises(ExportCheckError, match=r"^onnxruntime output differs from eager PyTorch by .* more than "
                                               r"1e-04: export removed \(checked on the features before the "
                                               r"classifier: the outputs are the same for every input\)$"):
        export_model(model, tmp_path / 'model.onnx', 'onnxruntime', img_size=64, tune=False)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_eager_outputs_are_blamed_on_the_weights_not_the_runtime(tmp_path, monkeypatch):
    pytest.importorskip('onnxruntime')
    net = nn.Sequential(nn.Conv2d(3, 4, 1)).eval()
    net[0].weight.data[0] = torch.nan
    monkeypatch.setattr(export_module, '_export_onnx', lambda graph, path, *args: path.write_bytes(b'onnx'))
    with pytest.raises(ExportCheckError, match="eager PyTorch's own output holds inf or nan at batch 1: the model's "
                                               "weights are not finite, or so large"):
        export_model(net, tmp_path / 'net.onnx', 'onnxruntime', img_size=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('runtime', RUNTIMES)
def test_missing_runtime_names_the_extra(runtime, tmp_path, hide_package):
    hide_package(runtime)
    with pytest.raises(MissingRuntimeError) as error:
        export_model(nn.Conv2d(3, 3, 1), tmp_path / 'model.xml', runtime)
    message = str(error.value)
    assert DEPLOY_EXTRA in message and runtime in message and '\n' not in message
    assert list(tmp_path.iterdir()) == []


def test_a_runtime_that_fails_to_import_otherwise_is_one_line(tmp_path, monkeypatch):
    """A broken install raises what it likes on import (OSError for a missing shared library, ...)."""
    real_import = importlib.import_module

    def broken(name, *args):
        if name == 'onnxruntime':
            raise OSError('libonnxruntime.so.1: cannot open shared object file\nsecond line')
        return real_import(name, *args)
    monkeypatch.setattr(importlib, 'import_module', broken)
    with pytest.raises(ExportError, match=re.escape(
            'exporting for onnxruntime needs the onnxruntime package, which is installed but fails to import '
            '(OSError: libonnxruntime.so.1: cannot open shared object file): reinstall it, pip install '
            '--force-reinstall onnxruntime')):
        export_model(nn.Conv2d(3, 3, 1), tmp_path / 'model.onnx', 'onnxruntime')
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match='unknown runtime'):
        require_runtime('tensorrt')
    pytest.importorskip('openvino')
    with pytest.raises(ExportError, match=r'\.xml'):
        export_model(nn.Conv2d(3, 3, 1), tmp_path / 'model.onnx', 'openvino')
    with pytest.raises(ValueError, match='batch_size'):
        export_model(nn.Conv2d(3, 3, 1), tmp_path / 'model.onnx', 'onnxruntime', batch_size=0)
    assert list(tmp_path.iterdir()) == []
