"""What a hostile or careless checkpoint, path or command line gets from `timm-epsa`: a clear
one-line refusal that leaves nothing behind, or its text escaped where it is shown."""
import argparse
import html
import os
import re
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

import timm_epsa  # noqa: F401  registers the models
from cli_run import assert_one_line_error, run_cli
from timm_epsa import cli
from timm_epsa.deploy.export import ExportedModel
from timm_epsa.deploy.graph_export import ExportReport
from timm_epsa.hub import PretrainedWeightsError
from timm_epsa.hub.checkpoint import (
    CheckpointError, NonFiniteWeightsError, check_values, nonfinite_weights_allowed, read_checkpoint,
    recorded_data_config)
from timm_epsa.hub.convert import _describe_weights
from timm_epsa.escaping import code_block, code_span, one_line, shell_word

pytest_plugins = ['hub_stub']  # fixtures: converted (a train.py checkpoint of epsanet50 and its source)
pytestmark = pytest.mark.usefixtures('single_thread')

CONVERT = ['--model', 'epsanet50']


def convert(capsys, src, out, *args):
    """``timm-epsa convert`` that must fail: its one error line; nothing may be left beside OUT."""
    status, stdout, err = run_cli(capsys, 'convert', src, out, *CONVERT, *args)
    assert status == 1 and stdout == '', err
    return err


@pytest.fixture
def tiny_model():
    return timm.create_model('epsanet50', layers=(1, 1, 1, 1))


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd['conv1.weight'][0, 0, 0].fill_(float('inf')),
     'conv1.weight holds 7 non-finite values (inf or nan): the training run diverged or the file is damaged; '
     'use another checkpoint, or pass --allow-nonfinite to convert it as it is'),
    (lambda sd: sd.__setitem__('fc.bias', sd['fc.bias'].to(torch.int32)),
     'fc.bias holds torch.int32 values where the model has torch.float32 ones (quantized or damaged weights)'),
    (lambda sd: sd['bn1.running_var'].fill_(-1.), 'bn1.running_var holds negative variances'),
])
def test_convert_refuses_weights_the_model_would_take_silently_wrong(converted, capsys, tmp_path, change, message):
    _, _, source = converted
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    change(state_dict)
    safetensors.torch.save_file(state_dict, tmp_path / 'weights.safetensors')
    err = convert(capsys, tmp_path / 'weights.safetensors', tmp_path / 'out')
    assert_one_line_error(err, 'convert', message)
    assert [p.name for p in tmp_path.iterdir()] == ['weights.safetensors']


def test_check_values_allows_nonfinite_only_when_asked(tiny_model):
    state_dict = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state_dict['fc.weight'][0, 0] = float('nan')
    with pytest.raises(CheckpointError, match='fc.weight holds 1 non-finite values'):
        check_values(state_dict, tiny_model, what='w')
    check_values(state_dict, tiny_model, what='w', allow_nonfinite=True)
    state_dict['fc.weight'] = state_dict['fc.weight'].to(torch.bool)
    with pytest.raises(CheckpointError, match='fc.weight holds torch.bool values'):
        check_values(state_dict, tiny_model, what='w', allow_nonfinite=True)


def test_check_values_sees_the_values_as_the_model_will_hold_them(tiny_model):
    """A float64 value beyond float32's range becomes inf in the model; a sparse tensor is no weight."""
    state_dict = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state_dict['fc.weight'] = state_dict['fc.weight'].double()
    state_dict['fc.weight'][0, 0] = 1e300
    with pytest.raises(CheckpointError, match='fc.weight holds 1 non-finite values'):
        check_values(state_dict, tiny_model, what='w')
    state_dict['fc.weight'] = tiny_model.state_dict()['fc.weight'].to_sparse()
    with pytest.raises(CheckpointError, match='fc.weight is a sparse_coo tensor, where the model has a dense one'):
        check_values(state_dict, tiny_model, what='w')


@pytest.mark.parametrize('args, message', [
    (dict(std=(0., 0., 0.)), 'std=(0.0, 0.0, 0.0), which is not 1 or 3 positive numbers'),
    (dict(mean=[float('nan')]), 'mean=[nan], which is not 1 or 3 finite numbers'),
    (dict(input_size=(3, 0, -5)), 'input_size=(3, 0, -5), but image sides are whole numbers of pixels from 1 to 8192'),
    (dict(img_size=10 ** 9), 'img_size=1000000000, but image sides are whole numbers of pixels'),
    (dict(input_size=(3, 224)), 'input_size=(3, 224), which is not (3, height, width)'),
    (dict(in_chans=1), 'in_chans=1, but the weights take 3 input channels'),
    (dict(interpolation='"><script>'), "interpolation='\"><script>', which is not one of timm's: nearest, bilinear"),
    (dict(crop_pct=1e-9), 'crop_pct=1e-09, which is not a number from 0.1 to 2.0'),
    (dict(crop_mode='zoom'), "crop_mode='zoom', which is not one of timm's: center, squash, border"),
])
def test_recorded_preprocessing_that_cannot_be_is_refused(tiny_model, args, message):
    with pytest.raises(CheckpointError, match=re.escape(f'ck.pth: its training arguments record {message}')) as e:
        recorded_data_config(argparse.Namespace(**args), tiny_model, what='ck.pth')
    assert e.match("pass --ignore-train-args to use epsanet50's default preprocessing instead")


def test_recorded_preprocessing_reaches_config_json_as_timm_resolves_it(tiny_model):
    args = argparse.Namespace(img_size=160, interpolation='bicubic', mean=[0.5], std=(0.25, 0.5, 0.5), crop_pct=0.95)
    assert recorded_data_config(args, tiny_model, what='ck.pth') == dict(
        input_size=(3, 160, 160), interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5),
        crop_pct=0.95, crop_mode='center')


def test_convert_refuses_bad_recorded_arguments_unless_told_to_ignore_them(capsys, tmp_path):
    torch.save({'state_dict': {'a': torch.ones(1)}, 'args': argparse.Namespace(std=[0.])}, tmp_path / 'ck.pth')
    err = convert(capsys, tmp_path / 'ck.pth', tmp_path / 'out')
    assert_one_line_error(err, 'convert', 'ck.pth: its training arguments record std=[0.0]', '--ignore-train-args')
    err = convert(capsys, tmp_path / 'ck.pth', tmp_path / 'out', '--ignore-train-args')
    assert_one_line_error(err, 'convert', 'does not fit epsanet50')  # the next check: the arguments were left out
    assert [p.name for p in tmp_path.iterdir()] == ['ck.pth']


def test_what_a_checkpoint_records_beside_its_weights_is_kept_only_if_it_is_a_value(tmp_path):
    torch.save({
        'state_dict': {'a': torch.ones(1)}, 'epoch': torch.tensor([1, 2]), 'metric': float('nan'), 'arch': 'x\n# y',
        'args': argparse.Namespace(eval_metric='<b>top1</b>'),
    }, tmp_path / 'ck.pth')
    checkpoint = read_checkpoint(tmp_path / 'ck.pth')
    assert (checkpoint.epoch, checkpoint.metric, checkpoint.metric_name, checkpoint.arch) == (None, None, None, None)
    assert checkpoint.ignored == [
        "its eval_metric ('<b>top1</b>') is not a name", "its arch ('x\\n# y') is not a name",
        'its epoch (a tensor of shape (2,)) is not a whole number', 'its metric (nan) is not a finite number',
    ]
    torch.save({'state_dict': {'a': torch.ones(1)}, 'epoch': torch.tensor([7]), 'best_prec1': torch.tensor(77.5)},
               tmp_path / 'ck.pth')
    checkpoint = read_checkpoint(tmp_path / 'ck.pth')
    assert (checkpoint.epoch, checkpoint.metric, checkpoint.ignored) == (7, 77.5, [])


def test_a_state_dict_with_keys_that_are_not_names_is_refused_saying_so(capsys, tmp_path):
    torch.save({'a': torch.ones(1), 1: torch.ones(1)}, tmp_path / 'ck.pth')
    err = convert(capsys, tmp_path / 'ck.pth', tmp_path / 'out')
    assert_one_line_error(err, 'convert', 'not a state dict of a PyTorch model, it has keys that are not parameter '
                                          'names (1 (int))')


def test_text_from_a_checkpoint_in_an_error_stays_on_one_line(capsys, tmp_path):
    safetensors.torch.save_file({'a\n\x1b[2Jb\u202e': torch.ones(1)}, tmp_path / 'w.safetensors')
    err = convert(capsys, tmp_path / 'w.safetensors', tmp_path / 'out')
    line = assert_one_line_error(err, 'convert', r'unexpected: a \x1b[2Jb\u202e (1,)')
    assert '\x1b' not in line and '\u202e' not in line


def test_the_model_card_shows_names_from_outside_as_code():
    checkpoint = argparse.Namespace(kind='state dict', ema=False, epoch=None, metric=None)
    assert _describe_weights(checkpoint, 'x`<img src=x>\n# y.pth').startswith(
        'from the state dict ``x`<img src=x> # y.pth``; converted')


def test_text_from_a_checkpoint_is_no_markup_on_the_card():
    """A recorded training argument reaches the card exactly, as text, with no tag or heading in the
    rendered card and no raw ``<script>`` in the file (a fenced code block kept it raw there)."""
    markdown_it = pytest.importorskip('markdown_it')
    hostile = "--aa '</code></pre>\n# Heading <script>alert(1)</script> ``` &amp;'"
    rendered = markdown_it.MarkdownIt('commonmark').render(f'before\n\n{code_block(hostile)}\n\nafter\n')
    assert '<script' not in code_block(hostile) and '<script' not in rendered and '<h1>' not in rendered
    assert rendered == f'<p>before</p>\n{code_block(hostile)}\n<p>after</p>\n'
    assert html.unescape(code_block(hostile).removeprefix('<pre><code>').removesuffix('</code></pre>')) == hostile


def test_escaping():
    assert one_line('a\r\n# b\x1b[31m\t\u202ec' + os.fsdecode(b'\xff')) == r'a # b\x1b[31m \u202ec\xff'
    assert one_line(' epoch 1/1  loss 2.0 \n') == 'epoch 1/1  loss 2.0'  # columns kept
    assert code_span('a``b') == '```a``b```' and code_span('`a') == '`` `a ``'
    assert code_block('x ```` y <b>&amp;</pre>') == '<pre><code>x ```` y &lt;b&gt;&amp;amp;&lt;/pre&gt;</code></pre>'
    assert shell_word("it's") == "'it'\"'\"'s'"


@pytest.mark.parametrize('repo_id', ['bad id', 'me/too/deep', 'noslash', 'me/-x', 'me/x..y'])
def test_convert_refuses_a_repo_id_the_hub_would_before_any_work(capsys, tmp_path, repo_id):
    err = convert(capsys, tmp_path / 'missing.pth', tmp_path / 'out', '--repo-id', repo_id)
    assert_one_line_error(
        err, 'convert', f'--repo-id {repo_id!r} is not a repo id the Hub accepts', 'e.g. me/epsanet50.in1k')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('src, message', [
    ('.', 'is a folder; give the checkpoint file in it'),
    ('/dev/null', 'is not a regular file'),
    (os.fsdecode(b'ck\xff.pth'), r'ck\xff.pth: the path is not valid UTF-8'),
])
def test_convert_refuses_a_source_that_is_no_checkpoint_file(capsys, tmp_path, monkeypatch, src, message):
    monkeypatch.chdir(tmp_path)
    if src.startswith('ck'):
        (tmp_path / src).write_bytes(b'')
    assert_one_line_error(convert(capsys, src, 'out'), 'convert', message)
    assert [p.name for p in tmp_path.iterdir()] == ([src] if src.startswith('ck') else [])


@pytest.mark.parametrize('out, message', [
    ('.', '. is the current folder or holds it, which cannot be replaced'),
    ('x' * 256, 'the name is 256 bytes long, more than the 255 a file name can have'),
    (os.fsdecode(b'out\xff'), r'out\xff: the path is not valid UTF-8'),
])
def test_convert_refuses_an_out_dir_it_cannot_write_before_any_work(converted, capsys, tmp_path, monkeypatch, out,
                                                                    message):
    checkpoint, _, _ = converted
    monkeypatch.chdir(tmp_path)
    err = convert(capsys, checkpoint, out)
    assert 'reading' not in err
    assert_one_line_error(err, 'convert', message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('command', [['info', 'epsanet50.no_such_tag'], ['card', 'epsanet50.no_such_tag']])
def test_an_unknown_tag_is_refused_not_shown_as_another(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, *command)
    assert exit_.value.code == 2
    assert "epsanet50 has no tag 'no_such_tag'; its tags: epsanet50.in1k" in capsys.readouterr().err


def test_push_with_the_hub_unreachable_is_one_line(converted, capsys, monkeypatch):
    _, folder, _ = converted
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')  # discard: nothing listens there
    monkeypatch.setenv('HF_TOKEN', 'hf_' + 'x' * 34)
    status, _, err = run_cli(capsys, 'push', folder, 'timm-epsa/epsanet50.in1k')
    assert status == 1
    assert_one_line_error(err, 'push', 'cannot reach the Hub at http://127.0.0.1:9', 'push again')


def test_disk_full_during_convert_is_one_line_and_leaves_out_dir(converted, capsys, tmp_path):
    checkpoint, _, _ = converted
    mount = tmp_path / 'small'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root, or a mount namespace)')
    try:
        out = mount / 'out'
        out.mkdir()
        (out / 'old.txt').write_text('old')
        err = convert(capsys, checkpoint, out, '--force')
        assert_one_line_error(err, 'convert', f'no space left on the device for {out} (No space left on device); '
                                              f'{out} is unchanged: free some space or write it elsewhere')
        assert [p.name for p in mount.iterdir()] == ['out'] and [p.name for p in out.iterdir()] == ['old.txt']
    finally:
        subprocess.run(['umount', str(mount)], check=True)


# Weights a model would take silently wrong, each with what every route that loads them must say.
DAMAGED_WEIGHTS = {
    'int32': (lambda sd: sd.__setitem__('fc.weight', (sd['fc.weight'] * 1e9).to(torch.int32)),
              'fc.weight holds torch.int32 values where the model has torch.float32 ones (quantized or damaged '
              'weights), which loading would silently cast'),
    'nan': (lambda sd: sd['layer1.0.conv2.conv_2.weight'].view(-1)[5].fill_(float('nan')),
            'layer1.0.conv2.conv_2.weight holds 1 non-finite values (inf or nan): the training run diverged or the '
            'file is damaged; use another checkpoint'),
    'overflow': (lambda sd: sd.__setitem__('fc.bias', torch.full_like(sd['fc.bias'], 1e300, dtype=torch.float64)),
                 "fc.bias holds 1000 non-finite values (inf or nan) once cast to the model's torch.float32"),
    'shape': (lambda sd: sd.__setitem__('layer1.0.conv2.conv_1.weight', sd['layer1.0.conv2.conv_1.weight'][:8]),
              'of another shape: layer1.0.conv2.conv_1.weight (8, 64, 3, 3) vs (16, 64, 3, 3) in the model'),
}


def damaged_folder(folder, damage):
    """A Hub folder of an epsanet50 with layers=(1, 1, 1, 1) (config.json says so) holding weights with ``damage``."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', layers=(1, 1, 1, 1))
    save_for_hf(model, folder, model_args=dict(layers=[1, 1, 1, 1]), safe_serialization=True)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    DAMAGED_WEIGHTS[damage][0](state_dict)
    safetensors.torch.save_file(state_dict, folder / 'model.safetensors')
    return folder


@pytest.mark.parametrize('route', ['file', 'local-dir', 'hub'])
@pytest.mark.parametrize('damage', DAMAGED_WEIGHTS)
def test_every_pretrained_route_checks_the_weights_as_convert_does(tmp_path, request, route, damage):
    """One check (hub.checkpoint.check_weights) for every way pretrained=True reads weights: before it, a
    file or folder holding an int32 tensor or non-finite values loaded silently cast or as nan."""
    folder = damaged_folder(tmp_path / 'folder', damage)
    tiny = dict(layers=(1, 1, 1, 1))
    with pytest.raises((CheckpointError, PretrainedWeightsError), match=re.escape(DAMAGED_WEIGHTS[damage][1])):
        if route == 'file':
            timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(
                file=str(folder / 'model.safetensors')), **tiny)
        elif route == 'local-dir':
            timm.create_model(f'local-dir:{folder}', pretrained=True)
        else:
            request.getfixturevalue('hub').serve('lab/damaged', folder)
            timm.create_model(
                'epsanet50', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='lab/damaged'), **tiny)


@pytest.mark.parametrize('damage', ['int32', 'nan'])
def test_export_refuses_damaged_weights_as_weights_in_one_line(converted, capsys, tmp_path, damage):
    """From a folder (exported and "checked" before: int32 read as floats, nan blamed on the runtime) and a
    checkpoint (advised --allow-nonfinite, which export does not have)."""
    pytest.importorskip('onnxruntime')
    _, _, source = converted
    folder = damaged_folder(tmp_path / 'folder', damage)
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    DAMAGED_WEIGHTS[damage][0](state_dict)
    checkpoint = tmp_path / 'weights.safetensors'
    safetensors.torch.save_file(state_dict, checkpoint)
    for args in ([folder], [checkpoint, '--model', 'epsanet50']):
        status, _, err = run_cli(capsys, 'export', args[0], tmp_path / 'out.onnx', '--runtime', 'onnxruntime',
                                 '--img-size', 32, *args[1:])
        assert status == 1
        line = assert_one_line_error(err, 'export', f'{args[0]}', DAMAGED_WEIGHTS[damage][1])
        assert '--allow-nonfinite' not in line and 'differs' not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['folder', 'weights.safetensors']


def test_files_a_command_writes_follow_the_umask(converted):
    """model.safetensors was 0600 (safetensors' own choice) beside a config and card of 0644."""
    _, folder, _ = converted
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        ['README.md', 'config.json', 'model.safetensors'], 0o666 & ~umask)


@pytest.mark.parametrize('command', [
    ['convert', 'ck.pth', 'OUT', '--model', 'epsanet50'],
    ['export', 'epsanet50', 'OUT.onnx', '--runtime', 'onnxruntime'],
    ['export', 'epsanet50', 'OUT', '--runtime', 'openvino'],
    ['quickstart', '--output', 'OUT'],
    ['quickstart', '--imagefolder', 'OUT'],
], ids=['convert', 'export-onnxruntime', 'export-openvino', 'quickstart-output', 'quickstart-imagefolder'])
def test_no_command_writes_through_a_link_at_out(capsys, tmp_path, monkeypatch, command):
    """A link to a checkpoint or to a folder, --force or not, and a dangling link: refused naming where it
    points, before any work, and nothing changes (the checkpoint became an ONNX file, the folder was
    replaced, folders were made where the dangling link pointed)."""
    if command[0] == 'export':
        pytest.importorskip(command[-1])
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'ck.pth').write_bytes(b'my checkpoint')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'notes.txt').write_text('mine')
    out = next(word for word in command if word.startswith('OUT'))
    for target, force in (('ck.pth', True), ('run', True), ('run', False), ('nowhere/deep/x', False)):
        (tmp_path / out).symlink_to(target)
        status, stdout, err = run_cli(capsys, *command, *['--force'] * force)
        assert status == 1 and stdout == '', err
        assert_one_line_error(err, command[0], f'{out} is a symbolic link to {tmp_path / target}',
                              'neither writes through a link nor replaces one')
        (tmp_path / out).unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ck.pth', 'run']
    assert (tmp_path / 'ck.pth').read_bytes() == b'my checkpoint'
    assert [p.name for p in (tmp_path / 'run').iterdir()] == ['notes.txt']


@pytest.mark.parametrize('change', [lambda data: data[:-1], lambda data: data + b'\0'], ids=['shorter', 'longer'])
def test_a_checkpoint_whose_storage_is_not_the_size_its_header_says_is_unreadable(capsys, tmp_path, change):
    """Read past the record's memory-mapped reading, then a traceback: RuntimeError, record size ... does not match."""
    saved = io.BytesIO()
    torch.save({'conv1.weight': torch.ones(64, 3, 7, 7)}, saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(tmp_path / 'ck.pth', 'w') as damaged:
        for entry in source.infolist():
            data = source.read(entry)
            damaged.writestr(entry, change(data) if '/data/' in entry.filename else data)
    try:
        torch.load(tmp_path / 'ck.pth', weights_only=True)
    except RuntimeError:
        pass
    else:  # torch 2.6 (the floor) reads past or short of the record without a word; nothing to tell it by
        pytest.skip(f'torch {torch.__version__} does not check the size of a storage record')
    err = convert(capsys, tmp_path / 'ck.pth', tmp_path / 'out')
    assert_one_line_error(err, 'convert', 'ck.pth is not a readable PyTorch checkpoint (damaged, or not written by '
                                          'torch.save): RuntimeError: record size')
    assert [p.name for p in tmp_path.iterdir()] == ['ck.pth']


HOSTILE_PATH = 'out\x1b[2J\x07\nwrote /etc/passwd: verified\u202e'


@pytest.mark.parametrize('command', ['convert', 'export', 'quickstart', 'push', 'info'])
def test_every_success_line_shows_paths_on_one_line_escaped(capsys, monkeypatch, command):
    """A user-given path (or one a Hub or cache answers with) holding ESC, BEL or a newline printed raw
    moved the cursor, rang, or forged a second line; convert escaped it, the other commands did not."""
    path = Path(HOSTILE_PATH)
    facts = argparse.Namespace(params=1e6)
    results = {
        'convert': ('convert_checkpoint', argparse.Namespace(
            path=path, model_name='epsanet50', facts=facts, checkpoint=argparse.Namespace(state_dict={}),
            repo_id='me/x'), ['ck.pth', 'out', '--model', 'epsanet50']),
        'export': ('export', ExportedModel(path, 'epsanet50', f'weights from {path}', ExportReport(
            'onnxruntime', (path,), (3, 32, 32), None, (1, 3), 1e-6)),
            ['ck.pth', 'o.onnx', '--runtime', 'onnxruntime']),
        'quickstart': ('run_quickstart', argparse.Namespace(path=path, repo_id='me/x', reloaded_accuracy=1.0), []),
        'push': ('push_folder', argparse.Namespace(commit_url=f'https://hub/{path}', oid='0' * 40), ['out', 'me/x']),
        'info': ('cached_weights', str(path), ['epsanet50']),
    }
    name, result, args = results[command]
    monkeypatch.setattr(cli, name, lambda *args, **kwargs: result)
    monkeypatch.setattr(cli, 'get_pretrained_cfg', lambda name: argparse.Namespace(hf_hub_id='me/epsanet50.in1k'))
    status, out, err = run_cli(capsys, command, *args)
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == {'convert': 2, 'export': 2, 'quickstart': 3, 'push': 2, 'info': 4}[command], out
    assert all(line.isprintable() for line in lines), out
    assert one_line(HOSTILE_PATH) in out and r'out\x1b[2J\x07 wrote /etc/passwd: verified\u202e' in out


@pytest.mark.parametrize('command', [
    ['convert', '', 'out', '--model', 'epsanet50'], ['convert', 'ck.pth', '', '--model', 'epsanet50'],
    ['export', '', 'm.onnx', '--runtime', 'onnxruntime'], ['export', 'epsanet50', '', '--runtime', 'openvino'],
    ['quickstart', '--output', ''], ['quickstart', '--imagefolder', ''], ['push', '', 'me/x'],
], ids=['convert-src', 'convert-out', 'export-source', 'export-out', 'quickstart-output', 'quickstart-imagefolder',
        'push'])
def test_an_empty_path_is_refused_as_such(capsys, tmp_path, monkeypatch, command):
    """An unset shell variable: it named the current folder ('. is a folder', an OUT inside the SOURCE
    folder '', or a quickstart over the current folder's name)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, *command)
    assert exit_.value.code == 2
    assert 'an empty path; give the name of a file or folder' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_convert_allow_nonfinite_keeps_them_and_loading_refuses_them_unless_allowed(converted, capsys, tmp_path):
    """The folder was refused by convert's own check that it loads back ('1 tensors changed': NaN != NaN);
    loading refuses non-finite weights like every route, but inside nonfinite_weights_allowed()."""
    _, _, source = converted
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    DAMAGED_WEIGHTS['nan'][0](state_dict)
    safetensors.torch.save_file(state_dict, tmp_path / 'nan.safetensors')
    status, stdout, err = run_cli(capsys, 'convert', tmp_path / 'nan.safetensors', tmp_path / 'out', *CONVERT,
                                  '--allow-nonfinite')
    assert status == 0 and 'verified' in stdout, err
    with pytest.raises(NonFiniteWeightsError, match=f"{tmp_path / 'out'}: layer1.0.conv2.conv_2.weight holds 1"):
        timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    with nonfinite_weights_allowed():
        loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    assert torch.isnan(loaded.layer1[0].conv2.conv_2.weight).sum() == 1
