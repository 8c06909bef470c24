"""What a hostile or careless checkpoint, path or command line gets from `timm-epsa`: a clear
one-line refusal that leaves nothing behind, or its text escaped where it is shown."""
import argparse
import os
import re
import subprocess

import pytest
import safetensors.torch
import timm
import torch

import timm_epsa  # noqa: F401  registers the models
from cli_run import assert_one_line_error, run_cli
from timm_epsa.hub.checkpoint import CheckpointError, check_values, read_checkpoint, recorded_data_config
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
     'convert another checkpoint, or pass --allow-nonfinite'),
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
    assert e.match('pass --ignore-train-args to convert it with epsanet50')


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


def test_escaping():
    assert one_line('a\r\n# b\x1b[31m\t\u202ec' + os.fsdecode(b'\xff')) == r'a # b\x1b[31m \u202ec\xff'
    assert one_line(' epoch 1/1  loss 2.0 \n') == 'epoch 1/1  loss 2.0'  # columns kept
    assert code_span('a``b') == '```a``b```' and code_span('`a') == '`` `a ``'
    assert code_block('x ```` y') == '`````\nx ```` y\n`````'
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
