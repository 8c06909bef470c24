"""``timm-epsa export``: each kind of SOURCE reaches a runtime that computes what eager PyTorch does,
and every way it can go wrong is one line that leaves OUT as it was."""

import json
import os
import pickle
import shutil

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_STD
from timm.models import save_for_hf

from cli_run import assert_one_line_error, run_cli
from numerics import assert_relative_close
from timm_epsa.deploy import DEPLOY_EXTRA, load_runner
from timm_epsa.deploy import export as export_cli
from timm_epsa.deploy import graph_export as deploy_export
from timm_epsa.deploy.rewrite import rewrite_psa

pytest_plugins = ['hub_stub']  # fixture: converted (a train.py checkpoint of epsanet50 and its Hub folder)
pytestmark = pytest.mark.usefixtures('single_thread', 'untimed_tuning')


def assert_runs_like(runtime, path, model, batch_size, img_size=64):
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_relative_close(torch.from_numpy(load_runner(runtime, path)(x.numpy())), model(x), rel=1e-4)


@pytest.mark.slow
def test_folder_to_onnxruntime_with_dynamic_batch(converted, tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    _, folder, source = converted
    status, out, err = run_cli(capsys, 'export', folder, tmp_path / 'epsanet50.onnx', '--runtime', 'onnxruntime',
                               '--img-size', 64)
    assert status == 0, err
    assert out.startswith(f"wrote {tmp_path / 'epsanet50.onnx'}: epsanet50 (weights from the folder {folder}) for "
                          f"onnxruntime, input 3x64x64, dynamic batch; checked at batch 1 and 3"), out
    assert [p.name for p in tmp_path.iterdir()] == ['epsanet50.onnx']  # no lock, no staging left beside it
    assert_runs_like('onnxruntime', tmp_path / 'epsanet50.onnx', source, batch_size=5)


@pytest.mark.slow
def test_checkpoint_to_openvino_with_fixed_batch(converted, tmp_path, capsys):
    pytest.importorskip('openvino')
    checkpoint, _, source = converted
    out_dir = tmp_path / 'ir'
    status, out, err = run_cli(capsys, 'export', checkpoint, out_dir, '--runtime', 'openvino', '--img-size', 64,
                               '--batch-size', 2)
    assert status == 0, err
    assert f"wrote {out_dir}/model.xml and {out_dir}/model.bin: epsanet50 (weights from {checkpoint})" in out, out
    assert 'batch 2; checked at batch 2' in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ir']
    assert sorted(p.name for p in out_dir.iterdir()) == ['model.bin', 'model.xml']
    assert_runs_like('openvino', out_dir / 'model.xml', source, batch_size=2)


@pytest.mark.slow
def test_failed_check_leaves_the_old_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip('onnxruntime')

    def broken_rewrite(model, form_of):
        graph = rewrite_psa(model, form_of)
        next(graph.layer1[0].conv2.branches[0].buffers()).mul_(1.5)  # one branch's weights off by half
        return graph

    monkeypatch.setattr(deploy_export, 'rewrite_psa', broken_rewrite)
    tiny = timm.create_model('epsanet50', layers=(1, 1, 1, 1)).eval()  # the wiring is the point, not the size
    monkeypatch.setattr(export_cli, 'model_from_source', lambda *args: (tiny, 'epsanet50', 'random weights'))
    out = tmp_path / 'model.onnx'
    out.write_text('the model I had')
    status, _, err = run_cli(capsys, 'export', 'epsanet50', out, '--runtime', 'onnxruntime', '--img-size', 32, '--force')
    assert status == 1
    assert_one_line_error(err, 'export', 'onnxruntime output differs from eager PyTorch', 'more than 1e-04')
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx'] and out.read_text() == 'the model I had'


@pytest.mark.parametrize('runtime, out_name', [('onnxruntime', 'model.onnx'), ('openvino', 'ir')])
def test_existing_out_is_kept_without_force(tmp_path, capsys, runtime, out_name):
    pytest.importorskip(runtime)
    out = tmp_path / out_name
    if runtime == 'openvino':
        out.mkdir()
        (out / 'model.xml').write_text('mine')
    else:
        out.write_text('mine')
    status, _, err = run_cli(capsys, 'export', 'epsanet50', out, '--runtime', runtime)
    assert status == 1
    assert_one_line_error(err, 'export', str(out), '--force')
    assert sorted(p.name for p in tmp_path.iterdir()) == [out_name]
    assert (out / 'model.xml' if runtime == 'openvino' else out).read_text() == 'mine'


@pytest.mark.parametrize('runtime', ['onnxruntime', 'openvino'])
def test_missing_runtime_names_the_extra(tmp_path, capsys, hide_package, runtime):
    hide_package(runtime)
    status, _, err = run_cli(capsys, 'export', 'epsanet50', tmp_path / 'out', '--runtime', runtime)
    assert status == 1
    assert_one_line_error(err, 'export', f'needs the {runtime} package', DEPLOY_EXTRA)
    assert list(tmp_path.iterdir()) == []


def test_bad_sources_are_named(converted, tmp_path, capsys, monkeypatch):
    pytest.importorskip('onnxruntime')
    _, folder, _ = converted
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'epsanet50').mkdir()  # a stray folder with a model's name
    save_for_hf(timm.create_model('resnet18', num_classes=2), tmp_path / 'resnet18')
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    (tmp_path / 'no_weights').mkdir()
    shutil.copy(folder / 'config.json', tmp_path / 'no_weights')
    (tmp_path / 'bad_json').mkdir()
    (tmp_path / 'bad_json' / 'config.json').write_text('{bad')
    for name, config in [('no_architecture', {'num_classes': 10}), ('a_list', ['epsanet50'])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / 'config.json').write_text(json.dumps(config))
    cases = [
        ('resnet50', 'neither a model name', 'a folder written by timm-epsa convert'),
        ('epsanet50.foo', "epsanet50 has no tag 'foo'; its tags: epsanet50.in1k"),
        ('hf-hub:timm/epsanet50.in1k', 'export reads local files', '--local-dir DIR'),
        (tmp_path / 'missing.pth', 'missing.pth: no such file or folder'),
        ('missing.pth', 'missing.pth: no such file or folder'),
        (tmp_path / 'empty', 'a folder without config.json', 'a checkpoint file, or a model name'),
        ('epsanet50', 'epsanet50 is a folder without config.json, which hides the model name epsanet50'),
        (tmp_path / 'resnet18', "holds 'resnet18', not an EPSANet variant", 'epsanet50'),
        (tmp_path / 'no_weights', 'has config.json but no model.safetensors'),
        (tmp_path / 'bad_json', 'config.json is not valid JSON (Expecting property name'),
        (tmp_path / 'no_architecture', f'{tmp_path}/no_architecture/config.json has no "architecture"; write the folder '
                                       f'again with timm-epsa convert'),  # was "holds None, not an EPSANet variant"
        (tmp_path / 'a_list', f'{tmp_path}/a_list/config.json is not a JSON object (it holds a list); write the '
                              f'folder again with timm-epsa convert'),
        (tmp_path / 'garbage.pth', 'garbage.pth'),
    ]
    for source, *fragments in cases:
        status, _, err = run_cli(capsys, 'export', source, tmp_path / 'out.onnx', '--runtime', 'onnxruntime')
        assert status == 1, source
        assert_one_line_error(err, 'export', *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'a_list', 'bad_json', 'empty', 'epsanet50', 'garbage.pth', 'no_architecture', 'no_weights', 'resnet18']


def test_bad_options_are_refused(tmp_path, capsys):
    for args, fragment in [
        (['--runtime', 'tensorrt'], "invalid choice: 'tensorrt'"),
        (['--runtime', 'onnxruntime', '--batch-size', 0], '--batch-size'),
        (['--runtime', 'onnxruntime', '--img-size', 7], 'argument --img-size: 7 is less than 8'),
        ([], '--runtime'),
    ]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(capsys, 'export', 'epsanet50', tmp_path / 'out.onnx', *args)
        assert exit_.value.code == 2
        assert fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('force', [False, True])
def test_out_that_would_replace_the_source_is_refused(tmp_path, capsys, force):
    pytest.importorskip('openvino')  # a runtime that is not installed is refused first
    checkpoint = tmp_path / 'run' / 'model_best.pth.tar'
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b'my weights')
    for out in (checkpoint, checkpoint.parent, tmp_path):
        status, _, err = run_cli(capsys, 'export', checkpoint, out, '--runtime', 'openvino', *['--force'] * force)
        assert status == 1
        assert_one_line_error(err, 'export', f'would replace SOURCE {checkpoint}')
    assert checkpoint.read_bytes() == b'my weights' and [p.name for p in tmp_path.iterdir()] == ['run']


def test_options_that_do_not_fit_the_source_or_runtime_are_refused(converted, tmp_path, capsys):
    for runtime in ('onnxruntime', 'openvino'):  # a runtime that is not installed is refused first
        pytest.importorskip(runtime)
    _, folder, _ = converted
    for args, fragments in [
        (['epsanet50', tmp_path / 'ir.xml', '--runtime', 'openvino'], ('is a folder for openvino', f"{tmp_path / 'ir'}-ir")),
        (['epsanet50', tmp_path / 'm.onnx', '--runtime', 'openvino'], ('is a folder for openvino', f"{tmp_path}/m-ir")),
        ([folder, tmp_path / 'm.onnx', '--runtime', 'onnxruntime', '--ema'],
         ('--model, --ema and --ignore-train-args are for a checkpoint',)),
        (['epsanet50', tmp_path / 'm.onnx', '--runtime', 'onnxruntime', '--model', 'epsanet101'], ('--model, --ema',)),
        ([folder, tmp_path / 'm.onnx', '--runtime', 'onnxruntime', '--ignore-train-args'], ('--model, --ema',)),
        (['epsanet50', tmp_path / 'config.json', '--runtime', 'onnxruntime'], ('must end in .onnx',)),
        ([folder, folder / 'model.onnx', '--runtime', 'onnxruntime'], ('is inside the SOURCE folder',)),
    ]:
        status, _, err = run_cli(capsys, 'export', *args)
        assert status == 1
        assert_one_line_error(err, 'export', *fragments)
    assert list(tmp_path.iterdir()) == []


def tiny_folder(folder, config_change=None, weights=None):
    """A Hub folder of epsanet50 with layers=(1, 1, 1, 1), its config.json changed by ``config_change``,
    its model.safetensors replaced by the bytes ``weights``."""
    save_for_hf(timm.create_model('epsanet50', layers=(1, 1, 1, 1)), folder, model_args=dict(layers=[1, 1, 1, 1]),
                safe_serialization=True)
    if config_change:
        config = json.loads((folder / 'config.json').read_text())
        config_change(config)
        (folder / 'config.json').write_text(json.dumps(config))
    if weights is not None:
        (folder / 'model.safetensors').write_bytes(weights)
    return folder


@pytest.mark.parametrize('config_change, weights, options, fragments', [
    (lambda c: c['model_args'].update(bogus=1), None, [],
     ("config.json's model_args for epsanet50: 'bogus' is not an argument epsanet50 takes",
      'remove it from config.json')),
    (None, pickle.dumps({'conv1.weight': [0.0]}), [], ('model.safetensors is not a valid safetensors file (',)),
    (None, b'', [], ('model.safetensors is not a valid safetensors file (', 'write it again')),
    (None, bytes(range(256)) * 4, [], ('model.safetensors is not a valid safetensors file (',)),
    (lambda c: c['pretrained_cfg'].update(input_size=[3, 0, 0]), None, [],
     ('folder/config.json gives input_size [3, 0, 0], which is not [channels, height, width] of 1 to 8192 channels '
      'and sides of 8 to 8192 pixels; correct it, or write the folder again with timm-epsa convert',)),
    (lambda c: c['pretrained_cfg'].update(input_size=[3, 7, 7]), None, [],  # as --img-size 7: refused alike
     ('folder/config.json gives input_size [3, 7, 7], which is not [channels, height, width] of 1 to 8192 channels '
      'and sides of 8 to 8192 pixels',)),
    (lambda c: c['pretrained_cfg'].update(input_size=[3, 1e5, 1e5]), None, [],
     ('config.json gives input_size [3, 100000.0, 100000.0], which is not [channels, height, width] of 1 to 8192',)),
    (lambda c: c['pretrained_cfg'].update(input_size=[3, 64]), None, ['--img-size', 32],
     ('config.json gives input_size [3, 64], which is not [channels, height, width]',)),
    (lambda c: c.pop('pretrained_cfg'), None, [],
     ('config.json does not describe a model timm can build (TypeError: PretrainedCfg.__init__() got an unexpected '
      'keyword argument', 'write the folder again with timm-epsa convert')),
    (lambda c: c['model_args'].update(layers='abc'), None, [], ('config.json does not describe a model timm can build',)),
    (None, None, ['--batch-size', 4096, '--img-size', 4096],
     ('runs it on a batch of 4096 images of 3x4096x4096, 825 GB of input',
      'give a smaller --img-size or --batch-size')),
], ids=['unknown-model-arg', 'pickle', 'empty', 'random-bytes', 'input-size-0', 'input-size-7', 'input-size-1e5',
    'input-size-2d', 'no-pretrained_cfg', 'layers-a-string', 'input-too-large'])
def test_a_folder_or_size_that_cannot_be_exported_is_one_line(capsys, tmp_path, config_change, weights, options,
                                                               fragments):
    """Each was a traceback (TypeError from ResNet.__init__, SafetensorError, an allocation failure or
    torch.export's escape-coded pages), or for 4096x4096 images at batch 4096 an attempt at 824 GB."""
    pytest.importorskip('onnxruntime')
    folder = tiny_folder(tmp_path / 'folder', config_change, weights)
    status, _, err = run_cli(capsys, 'export', folder, tmp_path / 'out.onnx', '--runtime', 'onnxruntime', *options)
    assert status == 1
    assert_one_line_error(err, 'export', *fragments)
    assert [p.name for p in tmp_path.iterdir()] == ['folder']


@pytest.mark.parametrize('source, out, fragments', [
    ('epsanet50.in1k', '.onnx', ('OUT .onnx is a suffix without a name; give a name, e.g. model.onnx',)),
    ('epsanet50', 'out.onnx', ('epsanet50 is not a readable PyTorch checkpoint',
                               'the file epsanet50 here hides the model name epsanet50: run from a directory without '
                               'such a file to export the model with random weights')),
], ids=['out-named-.onnx', 'file-named-like-a-model'])
def test_names_that_are_no_out_or_hide_a_model_are_said_so(capsys, tmp_path, monkeypatch, source, out, fragments):
    """'OUT .onnx must end in .onnx'; a file named epsanet50 was an unreadable checkpoint, no more
    (a folder of that name was already said to hide the model name)."""
    pytest.importorskip('onnxruntime')
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'epsanet50').write_text('my notes')
    status, _, err = run_cli(capsys, 'export', source, out, '--runtime', 'onnxruntime')
    assert status == 1
    assert_one_line_error(err, 'export', *fragments)
    assert os.listdir(tmp_path) == ['epsanet50']


def test_a_checkpoint_with_impossible_recorded_arguments_exports_with_ignore_train_args(converted, capsys, tmp_path):
    """export advised '--ignore-train-args to convert it', an option only convert had (and --ema's error
    said 'convert it without --ema')."""
    pytest.importorskip('onnxruntime')
    checkpoint, _, _ = converted
    content = torch.load(checkpoint, weights_only=False)
    content['args'].std = [0.]
    del content['state_dict_ema']
    torch.save(content, tmp_path / 'ck.pth')
    for option, fragments in [
        ([], ('ck.pth: its training arguments record std=[0.0]',
              "pass --ignore-train-args to use epsanet50's default preprocessing instead")),
        (['--ema'], ('ck.pth holds no EMA weights (no state_dict_ema or model_ema); leave out --ema',)),
    ]:
        status, _, err = run_cli(capsys, 'export', tmp_path / 'ck.pth', tmp_path / 'm.onnx', '--runtime', 'onnxruntime',
                                 *option)
        assert status == 1
        assert_one_line_error(err, 'export', *fragments)
    model, name, _ = export_cli.model_from_source(tmp_path / 'ck.pth', ignore_train_args=True)
    assert name == 'epsanet50' and model.pretrained_cfg['std'] == IMAGENET_DEFAULT_STD
    assert [p.name for p in tmp_path.iterdir()] == ['ck.pth']
