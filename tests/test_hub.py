"""Pretrained weights from the Hub: through a loopback stand-in for it (tests/hub_stub.py), serving
a folder made by ``timm-epsa convert``."""
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants

import timm_epsa  # noqa: F401  registers the models
from timm_epsa.models.epsanet import MODEL_NAMES
from timm.models import _builder, _hub, save_for_hf
from timm_epsa.hub import PretrainedWeightsError, cached_weights
from timm_epsa.hub.download import InvalidRevisionError
from timm_epsa.hub.repos import NAMESPACE_ENV, hub_namespace

pytest_plugins = ['hub_stub']  # fixtures: hub, converted (one conversion for the whole session)
pytestmark = pytest.mark.usefixtures('single_thread')

REPO = 'timm-epsa/epsanet50.in1k'  # where weights of epsanet50 would be published by this project
FROM_REPO = dict(pretrained_cfg_overlay=dict(hf_hub_id=REPO))  # no tag points there until they are


@pytest.fixture
def x():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _files_requested(hub):
    return {path.rsplit('/', 1)[-1] for _, path in hub.requests if '/resolve/' in path}


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_pretrained_comes_from_the_hub_then_from_the_cache_offline(converted, hub, x):
    _, folder, source = converted
    hub.serve(REPO, folder)
    expected = _outputs(source, x)

    assert torch.equal(_outputs(timm.create_model('epsanet50', pretrained=True, **FROM_REPO), x), expected)
    assert torch.equal(_outputs(timm.create_model(f'hf-hub:{REPO}', pretrained=True), x), expected)
    local_file = dict(file=str(folder / 'model.safetensors'))
    assert torch.equal(_outputs(timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=local_file), x),
                       expected)
    assert _files_requested(hub) == {'model.safetensors', 'config.json'}

    hub.stop()
    constants.HF_HUB_OFFLINE = True  # restored by the hub fixture
    assert torch.equal(_outputs(timm.create_model('epsanet50', pretrained=True, **FROM_REPO), x), expected)


@pytest.mark.slow
def test_with_a_namespace_every_listed_tag_loads_from_its_repo(hub, tmp_path, child_env):
    """TIMM_EPSA_HUB_NAMESPACE (read at registration, so in a new interpreter that never imports
    timm_epsa) points every tag at '<namespace>/<model>.in1k' and timm lists them; timm's own
    pretrained loading then fetches each from there (one block per stage, to keep it quick), and
    `timm-epsa info` shows the cached copies."""
    sources = {}
    for name in MODEL_NAMES:
        torch.manual_seed(0)
        model = timm.create_model(name, layers=(1, 1, 1, 1))
        save_for_hf(model, tmp_path / name, safe_serialization=True)
        hub.serve(f'testorg/{name}.in1k', tmp_path / name)
        sources[f'{name}.in1k'] = model.state_dict()
    script = textwrap.dedent("""
        import sys, safetensors.torch, timm
        tags = timm.list_pretrained('epsanet*')
        print(' '.join(sorted(tags)))
        for tag in tags:
            model = timm.create_model(tag, pretrained=True, layers=(1, 1, 1, 1))
            assert model.pretrained_cfg['hf_hub_id'] == 'testorg/' + tag, model.pretrained_cfg['hf_hub_id']
            safetensors.torch.save_file(model.state_dict(), f'{sys.argv[1]}/{tag}.safetensors')
        from timm_epsa.cli import main
        main(['info', 'epsanet50'])
    """)
    env = {**child_env, **hub.env(tmp_path / 'hf-home'), NAMESPACE_ENV: 'testorg'}
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    listed, *info = result.stdout.splitlines()
    assert listed.split() == sorted(sources)
    for tag, source in sources.items():
        tensors = safetensors.torch.load_file(tmp_path / f'{tag}.safetensors')
        assert tensors.keys() == source.keys()
        assert all(torch.equal(tensors[k], v) for k, v in source.items()), tag
    assert 'testorg/epsanet50.in1k' in info[1] and 'hf-home/hub/models--testorg--epsanet50.in1k/snapshots/' in info[1]
    assert 'Hub namespace: testorg' in result.stdout


@pytest.mark.parametrize('value', ['my org', 'org/sub', '-org', 'org.'])
def test_invalid_namespace_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(NAMESPACE_ENV, value)
    with pytest.raises(ValueError, match=f'{NAMESPACE_ENV}={value!r} is not a Hugging Face user or organisation'):
        hub_namespace()


@pytest.mark.slow
def test_invalid_namespace_costs_pretrained_weights_only(child_env):
    """The models still register; weights from their repos are refused, before any download."""
    script = textwrap.dedent("""
        import timm, timm_epsa
        timm.create_model('epsanet50', layers=(1, 1, 1, 1))
        try:
            timm.create_model('epsanet50', pretrained=True)
        except timm_epsa.hub.PretrainedWeightsError as e:
            print(e)
    """)
    env = {**child_env, NAMESPACE_ENV: 'my org', 'HF_HUB_OFFLINE': '1'}
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{NAMESPACE_ENV}='my org' is not a Hugging Face user or organisation name")


def test_namespace_defaults_to_the_project_and_accepts_any_valid_name(monkeypatch):
    monkeypatch.delenv(NAMESPACE_ENV, raising=False)
    assert hub_namespace() == 'timm-epsa'
    monkeypatch.setenv(NAMESPACE_ENV, 'my-lab_2.0')
    assert hub_namespace() == 'my-lab_2.0'


def test_num_classes_in_chans_and_features_adapt_the_hub_weights(converted, hub, x):
    _, folder, source = converted
    hub.serve(REPO, folder)
    source_tensors = source.state_dict()

    ten = timm.create_model('epsanet50', pretrained=True, num_classes=10, **FROM_REPO)
    assert ten.fc.weight.shape == (10, 2048)
    assert not torch.equal(ten.fc.weight, source_tensors['fc.weight'][:10])
    assert all(torch.equal(v, source_tensors[k]) for k, v in ten.state_dict().items() if not k.startswith('fc.'))

    gray = timm.create_model('epsanet50', pretrained=True, in_chans=1, **FROM_REPO)
    assert torch.equal(gray.conv1.weight, source_tensors['conv1.weight'].sum(dim=1, keepdim=True))
    assert all(torch.equal(v, source_tensors[k]) for k, v in gray.state_dict().items() if k != 'conv1.weight')

    backbone = timm.create_model('epsanet50', pretrained=True, features_only=True, out_indices=(4,), **FROM_REPO)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x)[0], source.forward_features(x))


def _pickle_only_repo(folder, tmp_path, payload, resnet50_state_dict):
    """config.json beside a pytorch_model.bin that runs code when unpickled."""
    repo = tmp_path / 'pickle-only'
    repo.mkdir()
    shutil.copy(folder / 'config.json', repo)
    torch.save({'weights': payload}, repo / 'pytorch_model.bin')
    return repo


def _truncated_repo(folder, tmp_path, payload, resnet50_state_dict):
    repo = tmp_path / 'truncated'
    shutil.copytree(folder, repo)
    data = (folder / 'model.safetensors').read_bytes()
    (repo / 'model.safetensors').write_bytes(data[:len(data) // 2])
    return repo


def _resnet_repo(folder, tmp_path, payload, resnet50_state_dict):
    repo = tmp_path / 'resnet'
    shutil.copytree(folder, repo)
    safetensors.torch.save_file(resnet50_state_dict, repo / 'model.safetensors')
    return repo


def _ten_class_repo(folder, tmp_path, payload, resnet50_state_dict):
    repo = tmp_path / 'ten-classes'
    save_for_hf(timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10), repo, safe_serialization=True)
    return repo


WAYS_OUT = [
    'timm-epsa convert', 'timm-epsa push', NAMESPACE_ENV, r"pretrained_cfg_overlay=dict\(hf_hub_id=",
    r"pretrained_cfg_overlay=dict\(file=",
]


@pytest.mark.parametrize('make_repo, model_name, kwargs, messages', [
    (None, 'epsanet50', {},
     ['No pretrained weights are published for epsanet50.in1k', 'the EPSANet authors released none', *WAYS_OUT]),
    (None, 'epsanet50.in1k', dict(features_only=True, num_classes=10),
     ['No pretrained weights are published for epsanet50.in1k', *WAYS_OUT]),
    (None, 'epsanet50', FROM_REPO,
     ["No weights are published at Hub repo 'timm-epsa/epsanet50.in1k'", 'does not exist or is private', *WAYS_OUT]),
    (None, 'epsanet101_large', dict(pretrained_cfg_overlay=dict(hf_hub_id='someone/elsewhere')),
     ["No weights are published at Hub repo 'someone/elsewhere'", *WAYS_OUT]),
    (_pickle_only_repo, 'epsanet50', dict(pretrained_cfg_overlay=dict(hf_hub_id='lab/pickle-only')),
     ["No weights are published at Hub repo 'lab/pickle-only'", 'it has no model.safetensors', 'never unpickled',
      *WAYS_OUT]),
    (_pickle_only_repo, 'hf-hub:lab/pickle-only', {}, ['it has no model.safetensors', 'never unpickled']),
    (None, 'epsanet50', dict(pretrained_cfg_overlay=dict(hf_hub_id=REPO, hf_hub_filename='pytorch_model.bin')),
     ["hf_hub_filename='pytorch_model.bin'", 'only as safetensors', *WAYS_OUT]),
    (_truncated_repo, 'epsanet50', dict(pretrained_cfg_overlay=dict(hf_hub_id='lab/truncated')),
     ["The model.safetensors in Hub repo 'lab/truncated' is not a valid safetensors file", 'upload it again']),
    (_resnet_repo, 'epsanet50', dict(pretrained_cfg_overlay=dict(hf_hub_id='lab/resnet')),
     ["The weights in Hub repo 'lab/resnet' do not fit epsanet50", r'missing: layer1\.0\.conv2\.conv_1\.weight',
      r'unexpected: layer1\.0\.conv2\.weight \(64, 64, 3, 3\)', *WAYS_OUT]),
    # timm drops the classifier and loads non-strictly here: the backbone must be checked all the same
    (_resnet_repo, 'epsanet50', dict(num_classes=10, pretrained_cfg_overlay=dict(hf_hub_id='lab/resnet')),
     ['do not fit epsanet50', r'missing: layer1\.0\.conv2\.conv_1\.weight']),
    (_resnet_repo, 'epsanet50', dict(features_only=True, pretrained_cfg_overlay=dict(hf_hub_id='lab/resnet')),
     ['do not fit epsanet50']),
    (_ten_class_repo, 'epsanet50', dict(layers=(1, 1, 1, 1), pretrained_cfg_overlay=dict(hf_hub_id='lab/ten-classes')),
     ["The weights in Hub repo 'lab/ten-classes' do not fit epsanet50: their classifier fc\\.weight \\(10, 2048\\) is "
      "for 10 classes", 'pass num_classes=10']),
])
def test_unusable_hub_weights_fail_with_a_clear_error(
        converted, hub, tmp_path, code_in_pickle, resnet50_state_dict, make_repo, model_name, kwargs, messages):
    _, folder, _ = converted
    payload, marker = code_in_pickle
    if make_repo is not None:
        repo = make_repo(folder, tmp_path, payload, resnet50_state_dict)
        hub.serve(f'lab/{repo.name}', repo)
    with pytest.raises(PretrainedWeightsError) as error:
        timm.create_model(model_name, pretrained=True, **kwargs)
    for message in messages:
        assert error.match(message)
    assert not marker.exists()
    assert 'pytorch_model.bin' not in _files_requested(hub)


def test_offline_without_a_cached_copy_says_so(hub):
    constants.HF_HUB_OFFLINE = True  # restored by the hub fixture
    with pytest.raises(PretrainedWeightsError, match=(
            r"Cannot fetch model.safetensors of Hub repo 'timm-epsa/epsanet50.in1k': HF_HUB_OFFLINE is set "
            r'and it is not in the local cache')):
        timm.create_model('epsanet50', pretrained=True, **FROM_REPO)
    assert not _files_requested(hub)


def test_weights_whose_bytes_do_not_match_their_sha256_are_refused_and_dropped_from_the_cache(converted, hub, x):
    """The Hub states a file's sha256 as its ETag: a download that does not match is not loaded,
    and is removed from the cache so that the next load downloads it anew."""
    _, folder, source = converted
    hub.serve(REPO, folder)
    hub.damaged.add((REPO, 'model.safetensors'))  # one byte of the last tensor altered on the way
    with pytest.raises(PretrainedWeightsError, match=(
            r"The weights of Hub repo 'timm-epsa/epsanet50.in1k' were refused: the model.safetensors of "
            r'timm-epsa/epsanet50.in1k in the cache does not match the sha256 the Hub states for it')):
        timm.create_model('epsanet50', pretrained=True, **FROM_REPO)
    assert cached_weights(REPO) is None and list(Path(constants.HF_HUB_CACHE).rglob('blobs/*')) == []
    hub.damaged.clear()
    assert torch.equal(_outputs(timm.create_model('epsanet50', pretrained=True, **FROM_REPO), x), _outputs(source, x))


def test_a_hub_that_never_answers_fails_within_the_timeout(converted, hub, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_ETAG_TIMEOUT', 1)
    hub.silent = True
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match=(
            rf"Cannot fetch model.safetensors of Hub repo 'timm-epsa/epsanet50.in1k': the Hub at {hub.url} did not "
            r'answer within 1 s, and model.safetensors of timm-epsa/epsanet50.in1k is not in the local cache')):
        timm.create_model('epsanet50', pretrained=True, **FROM_REPO)
    assert time.monotonic() - start < 15


def test_cached_weights_load_while_the_hub_is_silent(converted, hub, monkeypatch, x):
    _, folder, source = converted
    hub.serve(REPO, folder)
    timm.create_model('epsanet50', pretrained=True, **FROM_REPO)
    monkeypatch.setattr(constants, 'HF_HUB_ETAG_TIMEOUT', 1)
    hub.silent = True
    assert torch.equal(_outputs(timm.create_model('epsanet50', pretrained=True, **FROM_REPO), x), _outputs(source, x))


def test_a_revision_that_is_a_path_is_refused_before_huggingface_hub_writes_it(converted, hub, tmp_path, x):
    """huggingface_hub writes the commit a revision resolved to at <cache>/<repo>/refs/<revision>:
    ``../../../escaped`` would land in tmp_path, outside the cache."""
    _, folder, source = converted
    hub.serve('lab/epsanet', folder)
    hub.any_revision = True  # as the Hub resolves branch and tag names
    with pytest.raises(InvalidRevisionError, match=r"revision '../../../escaped' is not the name of a branch, tag or "):
        timm.create_model('hf-hub:lab/epsanet@../../../escaped', pretrained=True)
    for revision in ('a/../../b', 'main@x'):  # timm's own parser would assert on the second
        overlay = dict(hf_hub_id=f'lab/epsanet@{revision}')
        refused = f"Cannot load Hub repo 'lab/epsanet' at revision '{revision}': revision"
        with pytest.raises(PretrainedWeightsError, match=refused):
            timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=overlay)
    assert [p.name for p in tmp_path.iterdir() if p.name != 'hf-cache'] == []
    model = timm.create_model('hf-hub:lab/epsanet@refs/pr/1', pretrained=True)  # a name with '/' is a name
    assert torch.equal(_outputs(model, x), _outputs(source, x))


@pytest.mark.parametrize('source', ['local-dir', 'hf-hub'])
def test_a_folder_whose_classifier_does_not_match_its_config_names_the_config_field(hub, tmp_path, source):
    """The class count comes from the folder's config.json: that is what to fix, not a keyword of
    create_model the folder's user never passed."""
    folder = _ten_class_repo(None, tmp_path, None, None)
    config = json.loads((folder / 'config.json').read_text())
    model_args = {'layers': [1, 1, 1, 1]}  # as convert writes it; timm < 1.0.31 writes no model_args itself
    (folder / 'config.json').write_text(json.dumps({**config, 'num_classes': 1000, 'model_args': model_args}))
    hub.serve('lab/ten-classes', folder)
    name = f'local-dir:{folder}' if source == 'local-dir' else 'hf-hub:lab/ten-classes'
    where = f'{folder}/config.json' if source == 'local-dir' else "the config.json of Hub repo 'lab/ten-classes'"
    with pytest.raises((PretrainedWeightsError, timm_epsa.hub.checkpoint.CheckpointMismatchError), match=re.escape(
            f'their classifier fc.weight (10, 2048) is for 10 classes, but {where} says "num_classes": 1000: set it '
            f'to 10 there, or pass num_classes=<your number of classes> for a new classifier')) as error:
        timm.create_model(name, pretrained=True)
    assert 'pretrained_cfg_overlay' not in str(error.value).split(' To get pretrained')[0]


@pytest.mark.parametrize('file, message', [
    ('missing.safetensors', "Cannot load pretrained weights from the cfg's file='missing.safetensors': "
                            "missing.safetensors: no such file (relative to {cwd}); pass the path of a weights file"),
    ('folder', "file='folder': folder is a folder; give the checkpoint file in it (.pth, .pth.tar, .safetensors); "
               "or load the folder with timm.create_model('local-dir:folder', pretrained=True)"),
    ('/dev/null', "file='/dev/null': /dev/null is not a regular file"),
    # safetensors' own words differ by version ('header too small', 'HeaderTooSmall')
    ('empty.safetensors', 'empty.safetensors is not a valid safetensors file (Error while deserializing header: '),
])
def test_a_weights_file_in_the_overlay_that_is_none_is_refused_naming_it(tmp_path, monkeypatch, file, message):
    """timm raised a FileNotFoundError without a message for a missing file and for a folder, and
    safetensors' error for a damaged file names no file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'empty.safetensors').write_bytes(b'')
    with pytest.raises(PretrainedWeightsError, match=re.escape(message.format(cwd=tmp_path))):
        timm.create_model('epsanet50', pretrained=True, pretrained_cfg_overlay=dict(file=file))


@pytest.mark.parametrize('model_args, message', [
    ({'pretrained': True}, "config.json's model_args for epsanet50 set pretrained, which timm.create_model sets "
                           "itself; remove it from config.json"),
    ({'block': 'NoSuchBlock'}, "config.json's model_args for epsanet50: block='NoSuchBlock' is not a block class"),
    ({'act_layer': 'nosuchact'}, "act_layer='nosuchact' is not an activation timm knows"),
])
def test_config_json_model_args_epsanet_cannot_take_are_refused_naming_them(converted, tmp_path, model_args, message):
    _, folder, _ = converted
    config = json.loads((folder / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'model_args': model_args}))
    with pytest.raises(ValueError, match=re.escape(message)):
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)


_WRAPPED = ((_builder, 'load_pretrained'), (_hub, 'download_from_hf'), (_hub, '_parse_model_cfg'))


def _timm_before_install(monkeypatch):
    """timm's functions as they are before the rules are attached."""
    for module, name in _WRAPPED:
        monkeypatch.setattr(module, name, getattr(module, name).__wrapped__)


def _load_pretrained_without_filter_fn(model, pretrained_cfg=None, num_classes=1000, in_chans=3, strict=True):
    raise AssertionError('not called in these tests')


def _download_from_hf_by_repo(filename, repo_id, cache_dir=None):
    raise AssertionError('not called in these tests')


@pytest.mark.parametrize('change, left_out, message', [
    (lambda m: m.delattr(_hub, '_parse_model_cfg'), ['_parse_model_cfg'], r'timm\.models\._hub\._parse_model_cfg is gone'),
    (lambda m: m.delattr(_builder, '_resolve_pretrained_source'), ['load_pretrained'],
     r'timm\.models\._builder has no _resolve_pretrained_source'),
    (lambda m: m.setattr(_builder, 'load_pretrained', _load_pretrained_without_filter_fn), ['load_pretrained'],
     r'load_pretrained takes \(model, pretrained_cfg, num_classes, in_chans, strict\) where the rule needs '
     r'\(model, pretrained_cfg, \.\.\.\) with num_classes, filter_fn'),
    (lambda m: m.setattr(_hub, 'download_from_hf', _download_from_hf_by_repo), ['download_from_hf'],
     r'download_from_hf takes \(filename, repo_id, cache_dir\) where the rule needs \(model_id, \.\.\.\)'),
    (lambda m: m.setattr(_hub, '_parse_model_cfg', 42), ['_parse_model_cfg'], r'_parse_model_cfg has no readable signature'),
    (lambda m: (m.setattr(_builder, 'load_pretrained', _load_pretrained_without_filter_fn),
                m.setattr(_hub, 'download_from_hf', _download_from_hf_by_repo)),
     ['load_pretrained', 'download_from_hf'], r'load_pretrained takes .*; timm\.models\._hub\.download_from_hf takes'),

], ids=['gone', 'what-it-calls-gone', 'parameter-gone', 'first-parameter-renamed', 'no-signature', 'two-changed'])
def test_a_timm_function_of_another_shape_is_left_as_timm_has_it_with_one_warning(monkeypatch, change, left_out, message):
    """The rules wrap private timm functions: a timm release that changes one costs that rule, with one
    warning, never `import timm` (install runs inside it) nor a wrapper calling timm the old way."""
    _timm_before_install(monkeypatch)
    change(monkeypatch)
    before = {name: getattr(module, name, None) for module, name in _WRAPPED}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        timm_epsa.hub.install()
    shown = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(shown) == 1 and re.search(message, shown[0]), shown
    for module, name in _WRAPPED:
        now = getattr(module, name, None)
        if name in left_out:
            assert now is before[name]  # as timm has it
        else:
            assert now._timm_epsa_rules  # the others are attached all the same
