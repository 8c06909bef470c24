"""``timm-epsa export --precision``: bf16 for OpenVINO checked exactly in fp32 and within its tolerance in
bf16, int8 for both runtimes calibrated on a user's images and checked by top-1 agreement, and one
line that leaves OUT as it was for each way a precision or its images can be wrong."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_run import assert_one_line_error, run_cli
from numerics import assert_relative_close
from timm_epsa.deploy import DEPLOY_EXTRA, ExportCheckError, export_model, load_runner
from timm_epsa.deploy import export as export_cli
from timm_epsa.deploy import graph_export
from timm_epsa.deploy.calibration import MIN_CALIBRATION, MIN_HELD_OUT
from timm_epsa.deploy.rewrite import rewrite_psa
from timm_epsa.layers import PyramidSqueezeAttention

pytest_plugins = ['hub_stub']  # fixture: single_thread
pytestmark = pytest.mark.usefixtures('single_thread', 'untimed_tuning')

IMAGES = MIN_CALIBRATION + MIN_HELD_OUT


def psa_net() -> nn.Module:
    """A small classifier around one PSA layer: the wiring of an export in seconds."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2), nn.ReLU(), PyramidSqueezeAttention(32, 64, groups=(1, 2, 4, 8)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def write_images(folder, count: int, size: int = 64) -> None:
    """Noisy images of ten colours, in class folders as an ImageFolder has them."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (10, 3))
    for i in range(count):
        (folder / str(i % 10)).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(colours[i % 10] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / str(i % 10) / f'{i}.png')


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp('calibration')
    write_images(folder, IMAGES)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize('runtime, name', [('onnxruntime', 'model.onnx'), ('openvino', 'model.xml')])
def test_int8_export_is_quantized_and_agrees_with_fp32(runtime, name, images, tmp_path):
    pytest.importorskip(runtime)
    if runtime == 'openvino':
        pytest.importorskip('nncf')
    model = psa_net()
    report = export_model(model, tmp_path / name, runtime, img_size=16, precision='int8', calibration=images)
    assert report.precision == 'int8' and report.held_out == MIN_HELD_OUT
    assert report.agreement >= graph_export.MIN_AGREEMENT and report.max_error <= 1e-4  # fp32 graph, then int8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in report.files)  # no fp32 left
    text = (tmp_path / name).read_bytes()
    assert (b'QuantizeLinear' if runtime == 'onnxruntime' else b'FakeQuantize') in text
    x = torch.randn(5, 3, 16, 16)  # a batch size the check did not use
    with torch.no_grad():
        expected = model(x)
    actual = torch.from_numpy(load_runner(runtime, tmp_path / name, precision='int8')(x.numpy()))
    assert_relative_close(actual, expected, rel=0.2)  # int8: the right function, roughly


@pytest.mark.slow
def test_bf16_export_is_checked_in_fp32_and_in_bf16(tmp_path):
    pytest.importorskip('openvino')
    report = export_model(psa_net(), tmp_path / 'm.xml', 'openvino', img_size=16, precision='bf16')
    assert report.max_error <= 1e-4 and 0 < report.precision_error <= graph_export.BF16_TOLERANCE
    assert report.runs_in in ('bf16', 'f32')  # f32 where the CPU has no bf16 instructions
    assert b'bf16' not in (tmp_path / 'm.xml').read_bytes()  # the weights stay fp32


@pytest.mark.slow
def test_a_second_export_writes_the_same_file(tmp_path):
    pytest.importorskip('openvino')
    for name in ('a.xml', 'b.xml'):
        export_model(psa_net(), tmp_path / name, 'openvino', img_size=16, precision='bf16')
    assert (tmp_path / 'a.bin').read_bytes() == (tmp_path / 'b.bin').read_bytes()  # the same forms and weights
    # the same graph (OpenVINO numbers the names it makes up from a counter of the process)
    graphs = [re.sub(rb'_\d+"', b'"', (tmp_path / name).read_bytes()) for name in ('a.xml', 'b.xml')]
    assert graphs[0] == graphs[1]


@pytest.mark.slow
def test_a_wrong_psa_branch_cannot_hide_under_the_bf16_tolerance(tmp_path, monkeypatch):
    """A branch 1% off changes the logits by less than bf16 rounding does: the file's fp32 run finds it."""
    pytest.importorskip('openvino')

    def broken_rewrite(model, form_of):
        graph = rewrite_psa(model, form_of)
        next(graph[2].branches[0].buffers()).mul_(1.01)
        return graph
    monkeypatch.setattr(graph_export, 'rewrite_psa', broken_rewrite)
    with pytest.raises(ExportCheckError, match='openvino output differs from eager PyTorch') as error:
        export_model(psa_net(), tmp_path / 'm.xml', 'openvino', img_size=16, precision='bf16')
    assert '\n' not in str(error.value) and list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_source(monkeypatch):
    """``timm-epsa export`` of any SOURCE gets the small PSA network."""
    monkeypatch.setattr(export_cli, 'model_from_source', lambda *args: (psa_net(), 'epsanet50', 'random weights'))


@pytest.mark.slow
def test_int8_below_the_agreement_threshold_is_refused(images, tmp_path, capsys, monkeypatch, tiny_source):
    pytest.importorskip('onnxruntime')
    monkeypatch.setattr(graph_export, 'top1_agreement', lambda *args: (0.9, MIN_HELD_OUT))
    out = tmp_path / 'model.onnx'
    out.write_text('the model I had')
    status, _, err = run_cli(capsys, 'export', 'epsanet50', out, '--runtime', 'onnxruntime', '--img-size', 32,
                             '--precision', 'int8', '--calibration', images, '--force')
    assert status == 1
    assert_one_line_error(err, 'export', 'agrees with eager fp32', f'90.0% of {MIN_HELD_OUT} held-out images',
                          'less than 95%')
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx'] and out.read_text() == 'the model I had'


def test_precision_and_calibration_errors_are_one_line_and_leave_out_as_it_was(
        images, tmp_path, capsys, monkeypatch, hide_package, tiny_source):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('openvino')
    (tmp_path / 'empty').mkdir()
    write_images(tmp_path / 'few', IMAGES - 1, size=8)
    write_images(tmp_path / 'broken', IMAGES, size=8)
    (tmp_path / 'broken' / '3' / '3.png').write_bytes(b'not a png')
    (tmp_path / 'locked').mkdir()
    real_scandir = os.scandir
    monkeypatch.setattr(os, 'scandir', lambda path='.': (_ for _ in ()).throw(PermissionError(
        13, 'Permission denied', str(path))) if str(path) == str(tmp_path / 'locked') else real_scandir(path))
    out = tmp_path / 'out.onnx'
    out.write_text('mine')
    int8 = ['--precision', 'int8', '--calibration']
    cases = [
        (['--precision', 'bf16'], 'bf16 is not offered for onnxruntime', 'no bf16 convolutions', 'bf16 for openvino'),
        (['--precision', 'int8'], 'int8 needs calibration images', '--calibration DIR'),
        (['--calibration', images], '--calibration is for --precision int8'),
        ([*int8, tmp_path / 'missing'], f"calibration folder {tmp_path / 'missing'} does not exist"),
        ([*int8, out], f'calibration folder {out} is not a folder'),
        ([*int8, tmp_path / 'empty'], f"{tmp_path / 'empty'} holds 0 images", f'at least {IMAGES}'),
        ([*int8, tmp_path / 'few'], f"{tmp_path / 'few'} holds {IMAGES - 1} images", f'{MIN_HELD_OUT} held out'),
        ([*int8, tmp_path / 'broken'], f"calibration image {tmp_path / 'broken' / '3' / '3.png'} cannot be read"),
        ([*int8, tmp_path / 'locked'], f"calibration folder {tmp_path / 'locked'} cannot be read (Permission denied)"),
    ]
    for args, *fragments in cases:
        status, _, err = run_cli(capsys, 'export', 'epsanet50', out, '--runtime', 'onnxruntime', '--force', *args)
        assert status == 1, args
        assert_one_line_error(err, 'export', *fragments)
    hide_package('nncf')
    status, _, err = run_cli(capsys, 'export', 'epsanet50', tmp_path / 'ir', '--runtime', 'openvino', *int8, images)
    assert status == 1
    assert_one_line_error(err, 'export', 'openvino in int8 needs the nncf package', DEPLOY_EXTRA)
    assert out.read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['broken', 'empty', 'few', 'locked', 'out.onnx']
