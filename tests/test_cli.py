"""The ``timm-epsa`` command: convert, push, info, card, and the model cards in hub_cards/."""
import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard

import timm_epsa  # noqa: F401  registers the models
from timm.models import save_for_hf
from cli_run import assert_one_line_error, run_cli
from timm_epsa import cli
from timm_epsa.hub.checkpoint import CheckpointError, read_checkpoint
from timm_epsa.hub.config_json import transformers_compatible
from timm_epsa.hub.repos import NAMESPACE_ENV
from timm_epsa.staging import staged_folder

pytest_plugins = ['hub_stub']  # fixtures: hub, converted (one conversion for the whole session)
pytestmark = pytest.mark.usefixtures('single_thread')

REPO = Path(__file__).resolve().parents[1]


def test_convert_writes_what_timm_writes_and_a_card(converted, tmp_path):
    checkpoint, folder, source = converted
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']

    tensors = safetensors.torch.load_file(folder / 'model.safetensors')
    assert tensors.keys() == source.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in source.state_dict().items())

    save_for_hf(source, tmp_path, safe_serialization=True)  # what timm's own push_to_hf_hub uploads
    timm_config = json.loads((tmp_path / 'config.json').read_text())
    assert json.loads((folder / 'config.json').read_text()) == transformers_compatible(timm_config)

    card = ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'timm'
    assert card.data.tags == ['image-classification', 'timm']
    assert (card.data.license, card.data.pipeline_tag, card.data.datasets) == \
        ('apache-2.0', 'image-classification', ['imagenet-1k'])
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == \
        [('accuracy', 77.4), ('top_5_accuracy', 93.5)]
    for text in ('Params (M): 22.56', 'GMACs: 3.60', "timm.create_model('hf-hub:timm-epsa/epsanet50.in1k'",
                 'features_only=True', 'timm.data.create_transform', 'epoch 119', '--model epsanet50 --epochs 120',
                 '| **EPSANet-50 (Small)** | **22.56**', 'Mask R-CNN', '--decay-epochs 30',
                 '@inproceedings{zhang2022epsanet'):
        assert text in card.text, text
    # the recorded arguments as one shell line, in a block where none of their text is markup, even in the file
    assert ("\n<pre><code>--model epsanet50 --epochs 120 --opt sgd --lr 0.1 "
            "--aa 'rand-m9 ``` # Injected heading &lt;img src=x onerror=alert(1)&gt;'</code></pre>\n") in card.text
    assert '\n# Injected' not in card.text and '<img' not in card.text


@pytest.mark.parametrize('content, ema, kind, keys, metric', [
    # official main.py: DataParallel prefixes, best_prec1
    ({'epoch': 120, 'state_dict': {'module.a': torch.ones(1)}, 'best_prec1': torch.tensor(77.5), 'optimizer': {}},
     False, 'official main.py checkpoint', ['a'], ('top1', 77.5)),
    # timm train.py, plain and EMA weights
    ({'state_dict': {'a': torch.ones(1)}, 'state_dict_ema': {'a': torch.zeros(1)}, 'metric': 60.0,
      'args': argparse.Namespace(eval_metric='loss'), 'arch': 'epsanet50'},
     True, 'timm train.py checkpoint', ['a'], ('loss', 60.0)),
    ({'a': torch.ones(1), '_orig_mod.b': torch.ones(1)}, False, 'state dict', ['a', 'b'], (None, None)),
])
def test_checkpoint_formats(tmp_path, content, ema, kind, keys, metric):
    torch.save(content, tmp_path / 'checkpoint.pth')
    checkpoint = read_checkpoint(tmp_path / 'checkpoint.pth', ema=ema)
    assert (checkpoint.kind, sorted(checkpoint.state_dict), (checkpoint.metric_name, checkpoint.metric)) == \
        (kind, keys, metric)
    expected = content['state_dict_ema'] if ema else content.get('state_dict', content)
    assert all(torch.equal(v, expected[k]) for k, v in zip(expected, checkpoint.state_dict.values()))


def test_safetensors_source_and_missing_ema(tmp_path):
    safetensors.torch.save_file({'a': torch.ones(2)}, tmp_path / 'w.safetensors')
    checkpoint = read_checkpoint(tmp_path / 'w.safetensors')
    assert checkpoint.kind == 'safetensors file' and torch.equal(checkpoint.state_dict['a'], torch.ones(2))
    with pytest.raises(CheckpointError, match='holds no EMA weights'):
        read_checkpoint(tmp_path / 'w.safetensors', ema=True)


def test_convert_refuses_a_pickle_that_would_run_code(capsys, tmp_path, code_in_pickle):
    payload, marker = code_in_pickle
    torch.save({'state_dict': {}, 'payload': payload}, tmp_path / 'evil.pth')
    status, _, err = run_cli(capsys, 'convert', tmp_path / 'evil.pth', tmp_path / 'out', '--model', 'epsanet50')
    assert status == 1
    assert_one_line_error(err, 'convert', 'refusing to unpickle', f'{open.__module__}.open', 'weights_only=True')
    assert not marker.exists() and not (tmp_path / 'out').exists()

    torch.load(tmp_path / 'evil.pth', weights_only=False)  # the test's pickle is evil indeed
    assert marker.exists()


@pytest.mark.parametrize('content', [
    b'hello world, not a checkpoint\n',
    bytes(range(7, 107)),  # not a pickle
    b'\x80\x02}q\x00(X\x01\x00\x00\x00a',  # a pickle cut off midway
])
def test_convert_reports_a_damaged_file_as_unreadable(capsys, tmp_path, content):
    (tmp_path / 'damaged.pth.tar').write_bytes(content)
    status, _, err = run_cli(capsys, 'convert', tmp_path / 'damaged.pth.tar', tmp_path / 'out', '--model', 'epsanet50')
    assert status == 1
    assert_one_line_error(err, 'convert', 'damaged.pth.tar is not a readable PyTorch checkpoint')
    assert 'refusing' not in err and not (tmp_path / 'out').exists()


def test_convert_refuses_a_checkpoint_for_another_architecture(capsys, tmp_path, resnet50_state_dict):
    torch.save({'state_dict': resnet50_state_dict}, tmp_path / 'resnet.pth')
    status, _, err = run_cli(capsys, 'convert', tmp_path / 'resnet.pth', tmp_path / 'out', '--model', 'epsanet50')
    assert status == 1
    assert_one_line_error(
        err, 'convert', 'does not fit epsanet50', 'missing: layer1.0.conv2.conv_1.weight (16, 64, 3, 3)',
        'unexpected: layer1.0.conv2.weight (64, 64, 3, 3)')
    assert not (tmp_path / 'out').exists()


def test_convert_refuses_the_wrong_variant_naming_shapes(converted, capsys, tmp_path):
    checkpoint, _, _ = converted
    status, _, err = run_cli(capsys, 'convert', checkpoint, tmp_path / 'out', '--model', 'epsanet50_large')
    assert status == 1
    assert_one_line_error(
        err, 'convert', '(trained as epsanet50) does not fit epsanet50_large', 'of another shape',
        'layer1.0.conv1.weight (64, 64, 1, 1) vs (128, 64, 1, 1) in the model')


def test_convert_refuses_to_overwrite_without_force(converted, capsys, tmp_path):
    checkpoint, _, _ = converted
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    status, _, err = run_cli(capsys, 'convert', checkpoint, out, '--model', 'epsanet50')
    assert status == 1
    assert_one_line_error(err, 'convert', f'{out} is not empty', '--force')
    assert [p.name for p in out.iterdir()] == ['notes.txt']

    (out / 'checkpoint.pth').write_bytes(checkpoint.read_bytes())
    status, _, err = run_cli(capsys, 'convert', out / 'checkpoint.pth', out, '--model', 'epsanet50', '--force')
    assert status == 1
    assert_one_line_error(err, 'convert', 'which --force would delete')
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.pth', 'notes.txt']


def test_convert_failing_midway_leaves_nothing(converted, capsys, monkeypatch, tmp_path):
    checkpoint, _, _ = converted

    def disk_full(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr('timm_epsa.hub.folder.verify_hub_folder', disk_full)
    status, _, err = run_cli(capsys, 'convert', checkpoint, tmp_path / 'out', '--model', 'epsanet50')
    assert status == 1
    assert_one_line_error(err, 'convert', 'No space left on device')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize('existing', [False, True], ids=['new-folder', 'force-over-old-folder'])
def test_convert_killed_midway_leaves_no_partial_folder(converted, tmp_path, child_env, existing):
    """SIGKILL once the new folder is written but not yet in place: OUT_DIR is absent, or with
    --force still the old one, whole; the next run writing OUT_DIR removes what the killed one left
    and says so."""
    checkpoint, _, _ = converted
    out = tmp_path / 'out'
    if existing:
        out.mkdir()
        (out / 'old.txt').write_text('old')
    script = textwrap.dedent("""
        import os, signal, sys
        import timm_epsa.hub.convert
        timm_epsa.hub.folder.verify_hub_folder = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        from timm_epsa.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    result = subprocess.run(
        [sys.executable, '-c', script, 'convert', str(checkpoint), str(out), '--model', 'epsanet50', '--force'],
        env=child_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    if existing:
        assert [p.name for p in out.iterdir()] == ['old.txt']
    else:
        assert not out.exists()
    partial, = tmp_path.glob('.out.*.partial')  # the killed run's work, hidden beside OUT_DIR
    assert sorted(p.name for p in partial.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name, '.out.timm-epsa.lock'] + ['out'] * existing

    log = []
    with staged_folder(out, force=True, log=log.append) as staging:
        (staging / 'new.txt').write_text('new')
    assert log == [f'removed {partial.name} beside {out}: '
                   'the unfinished output (or the replaced content) of a timm-epsa run that was killed']
    assert [p.name for p in tmp_path.iterdir()] == ['out'] and [p.name for p in out.iterdir()] == ['new.txt']


def test_convert_force_replaces_only_with_a_complete_folder(converted, capsys, tmp_path):
    checkpoint, folder, _ = converted
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'old.txt').write_text('old')
    status, stdout, _ = run_cli(capsys, 'convert', checkpoint, out, '--model', 'epsanet50', '--force', '--ema')
    assert status == 0 and "verified" in stdout, capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert [p.name for p in tmp_path.iterdir()] == ['out']
    ema = torch.load(checkpoint, weights_only=False)['state_dict_ema']
    tensors = safetensors.torch.load_file(out / 'model.safetensors')
    assert all(torch.equal(tensors[k], v) for k, v in ema.items())


class _FakeHfApi:
    """Records what push asks of the Hub."""
    calls = []

    def __init__(self, **kwargs):
        pass

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(('create_repo', repo_id, private))
        return argparse.Namespace(repo_id=repo_id)

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(('create_branch', repo_id, branch))

    def upload_folder(self, repo_id, folder_path, allow_patterns, revision, commit_message):
        self.calls.append(('upload_folder', repo_id, Path(folder_path), revision))
        return argparse.Namespace(oid='0123abcd' * 5, commit_url=f'https://huggingface.co/{repo_id}/commit/0123abcd')


@pytest.fixture
def fake_hub_api(monkeypatch):
    monkeypatch.setattr('timm_epsa.hub.publish.HfApi', _FakeHfApi)
    _FakeHfApi.calls = []
    return _FakeHfApi.calls


def test_push_uploads_the_folder_and_prints_the_commit(converted, capsys, fake_hub_api):
    _, folder, _ = converted
    status, out, _ = run_cli(capsys, 'push', folder, 'timm-epsa/epsanet50.in1k', '--private', '--revision', 'v1')
    assert status == 0
    assert fake_hub_api == [
        ('create_repo', 'timm-epsa/epsanet50.in1k', True),
        ('create_branch', 'timm-epsa/epsanet50.in1k', 'v1'),
        ('upload_folder', 'timm-epsa/epsanet50.in1k', folder, 'v1'),
    ]
    assert f"timm.create_model('hf-hub:timm-epsa/epsanet50.in1k@{'0123abcd' * 5}', pretrained=True)" in out


def test_push_refuses_before_contacting_the_hub(converted, capsys, tmp_path, fake_hub_api):
    _, folder, _ = converted
    status, _, err = run_cli(capsys, 'push', folder, 'me/epsanet50.in1k')
    assert status == 1
    assert_one_line_error(err, 'push', "written for 'timm-epsa/epsanet50.in1k'", '--repo-id me/epsanet50.in1k')
    status, _, err = run_cli(capsys, 'push', tmp_path, 'me/epsanet50.in1k')
    assert status == 1
    assert_one_line_error(err, 'push', 'not a folder made by `timm-epsa convert`', 'model.safetensors')
    status, _, err = run_cli(capsys, 'push', folder, 'timm-epsa/epsanet50.in1k', '--revision', '../x')
    assert status == 1
    assert_one_line_error(err, 'push', "revision '../x' is not the name of a branch, tag or commit")
    linked = tmp_path / 'linked'
    linked.mkdir()
    for name in ('README.md', 'config.json'):
        (linked / name).write_bytes((folder / name).read_bytes())
    (linked / 'model.safetensors').symlink_to(tmp_path / 'secret')  # push would upload what it points to
    (tmp_path / 'secret').write_text('not weights')
    status, _, err = run_cli(capsys, 'push', linked, 'timm-epsa/epsanet50.in1k')
    assert status == 1
    assert_one_line_error(err, 'push', 'model.safetensors is a symlink, not a file convert wrote; refusing to upload')
    assert fake_hub_api == []


@pytest.mark.parametrize('repo_id', ['bad id', 'me/too/deep'])
def test_push_to_an_invalid_repo_id_says_the_id_is_invalid(converted, capsys, fake_hub_api, repo_id):
    """Not that the card is for another repo (which it also is): the id comes first."""
    _, folder, _ = converted
    status, _, err = run_cli(capsys, 'push', folder, repo_id)
    assert status == 1
    assert_one_line_error(
        err, 'push', f'REPO_ID {repo_id!r} is not a repo id the Hub accepts (', 'e.g. me/epsanet50.in1k')
    assert 'written for' not in err and fake_hub_api == []


@pytest.mark.parametrize('edit, message', [
    (lambda config: config.update(architecture='epsanet101'),
     'model.safetensors does not fit the epsanet101 that {folder}/config.json describes: 425 missing: '
     'layer3.6.conv1.weight'),
    (lambda config: config.pop('architecture'),
     "{folder}/config.json does not describe a model timm can build: it has no 'architecture'"),
    (lambda config: config.update(model_args={'foo': 1}),
     "{folder}/config.json does not describe a model timm can build: config.json's model_args for epsanet50: 'foo' "
     "is not an argument epsanet50 takes"),
], ids=['architecture-swapped', 'no-architecture', 'unknown-model-arg'])
def test_push_refuses_a_folder_whose_config_does_not_describe_its_weights(
        converted, capsys, tmp_path, fake_hub_api, edit, message):
    """An architecture swapped in config.json: timm refuses the folder, transformers would load it
    with random layers (tests/test_transformers.py); it is not published."""
    _, folder, _ = converted
    edited = tmp_path / 'edited'
    shutil.copytree(folder, edited)
    config = json.loads((edited / 'config.json').read_text())
    edit(config)
    (edited / 'config.json').write_text(json.dumps(config))
    status, _, err = run_cli(capsys, 'push', edited, 'timm-epsa/epsanet50.in1k')
    assert status == 1
    assert_one_line_error(err, 'push', message.format(folder=edited))
    assert fake_hub_api == []


def test_info_lists_variants_and_that_no_weights_are_published(capsys):
    """With a namespace it names the repos and the cached copies: see test_hub.py."""
    status, out, _ = run_cli(capsys, 'info')
    assert status == 0
    for row in ('epsanet50         22.56       3.60   224x224  epsanet50.in1k         none published  -',
                'epsanet101_large  53.74       9.67', 'Hub namespace: timm-epsa'):
        assert row in out, out
    status, out, _ = run_cli(capsys, 'info', 'epsanet50.in1k')
    assert status == 0 and 'epsanet101' not in out


@pytest.mark.parametrize('name', ['epsanet50', 'epsanet101', 'epsanet50_large', 'epsanet101_large'])
def test_hub_cards_are_the_rendered_template(capsys, monkeypatch, name):
    """hub_cards/ holds each variant's card as `timm-epsa card` renders it (hub_cards/README.md says
    how to regenerate them after changing the template)."""
    monkeypatch.delenv(NAMESPACE_ENV, raising=False)
    status, out, _ = run_cli(capsys, 'card', name)
    assert status == 0
    assert out == (REPO / 'hub_cards' / f'{name}.md').read_text(encoding='utf-8')
    assert ('This Large variant differs from the paper' in out) == name.endswith('_large')


@pytest.mark.parametrize('command', [[], *([add.__name__.removeprefix('_add_')] for add in cli.COMMANDS)])
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, '--help'])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: timm-epsa {' '.join(command)}".rstrip())


def test_invalid_namespace_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv(NAMESPACE_ENV, 'my org')
    status, _, err = run_cli(capsys, 'info')
    assert status == 1
    assert_one_line_error(err, 'info', f"{NAMESPACE_ENV}='my org' is not a Hugging Face user or organisation name")


def test_card_accuracy_must_be_a_percentage(capsys):
    for value, problem in (('abc', "'abc' is not a number"), ('101', '101 is not a percentage')):
        with pytest.raises(SystemExit) as exit_:
            cli.main(['card', 'epsanet50', '--top1', value])
        assert exit_.value.code == 2
        assert f'argument --top1: {problem}' in capsys.readouterr().err


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(['info', 'resnet50'])
    assert exit_.value.code == 2
    assert "unknown model 'resnet50'; choose from epsanet50" in capsys.readouterr().err


def test_version_is_the_package_version(capsys):
    """`timm-epsa --version`, and the installed metadata carries the same version (one source)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(['--version'])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f'timm-epsa {timm_epsa.__version__}\n'
    assert importlib.metadata.version('timm-epsa') == timm_epsa.__version__


@pytest.mark.parametrize('error', [
    PermissionError(13, 'Permission denied', '/srv/models/out'),
    FileNotFoundError(2, 'No such file or directory', '/srv/models/missing.pth'),
], ids=['permission', 'missing'])
def test_an_os_error_of_the_user_is_one_line(capsys, monkeypatch, error):
    """Only a closed output pipe ends quietly: other OSErrors are the user's to fix."""
    def fail(args):
        raise error
    monkeypatch.setattr(cli, '_info', fail)
    status, _, err = run_cli(capsys, 'info')
    assert status == 1
    assert_one_line_error(err, 'info', f'{error.strerror}: {error.filename!r}')


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_the_command_quietly_as_sigpipe_ends_a_unix_tool():
    """`timm-epsa info | head -1`: no error text, no traceback, and the status SIGPIPE gives (the
    shell's pipeline gives head's status, 0)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, whatever the timing (head's is not)
    try:
        closed = subprocess.run([sys.executable, '-m', 'timm_epsa', 'info', 'epsanet50'],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (closed.returncode, closed.stderr) == (128 + signal.SIGPIPE, '')
