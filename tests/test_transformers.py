"""Hugging Face transformers 5.x loads the folders the package writes (``timm-epsa convert``,
``timm-epsa quickstart``) through its timm wrapper, computing what timm computes; timm still loads them.

transformers rebuilds the network from ``config.json`` (``architecture`` + ``model_args``) with
``timm.create_model``, so ``epsanet50`` must be registered by the time it does: nothing here imports
timm_epsa for it but the start-up hook (the subprocess test shows it).
"""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from naive_epsanet import randomize_batchnorm_
from timm_epsa.hub.checkpoint import CheckpointError
from timm_epsa.hub.folder import write_hub_folder
from timm_epsa.hub.publish import push_folder
from timm_epsa.quickstart import LABELS, Recipe, create_digits_model

transformers = pytest.importorskip('transformers', minversion='5')
from transformers import (  # noqa: E402
    AutoImageProcessor, AutoModelForImageClassification, TimmWrapperModel, pipeline)

pytest_plugins = ['hub_stub']  # fixtures: hub, converted, child_env, single_thread
pytestmark = pytest.mark.usefixtures('single_thread')

TOL = dict(atol=1e-5, rtol=0)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _tiny_folder(root: Path, name: str, model: torch.nn.Module) -> Path:
    randomize_batchnorm_(model)
    folder = root / name
    folder.mkdir()
    write_hub_folder(model.eval(), folder, f'org/{name}')
    return folder


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """(folder, model): what ``timm-epsa quickstart`` writes (its model, preprocessing and class
    names), at wiring depth."""
    from hub_stub import one_thread  # here, once pytest has loaded hub_stub as a plugin

    with one_thread():  # module-scoped: set up before the single_thread fixture applies
        torch.manual_seed(0)
        model = create_digits_model(Recipe(img_size=32), layers=(1, 1, 1, 1))
        return _tiny_folder(tmp_path_factory.mktemp('digits'), 'epsanet50.digits', model), model


@pytest.fixture(params=['convert', 'quickstart'])
def written(request, converted, digits):
    """(folder, source model, class names) for each writer of Hub folders."""
    if request.param == 'convert':
        _, folder, source = converted
        return folder, source, ImageNetInfo().label_descriptions()
    folder, model = digits
    return folder, model, list(LABELS)


def test_folder_loads_in_transformers_as_in_timm(written):
    folder, source, label_names = written
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = create_transform(**resolve_data_config(model=model))(IMAGE).unsqueeze(0)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(expected, source(x))
        final, intermediates = model.forward_intermediates(x)

        processor = AutoImageProcessor.from_pretrained(folder)
        pixels = processor(IMAGE, return_tensors='pt')['pixel_values']
        assert torch.equal(pixels, x)  # timm's own eval transforms

        classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
        torch.testing.assert_close(classifier(pixels).logits, expected, **TOL)
        assert [classifier.config.id2label[i] for i in range(len(label_names))] == label_names

        backbone = TimmWrapperModel.from_pretrained(folder, output_hidden_states=True).eval()
        features = backbone(pixels)
        assert len(features.hidden_states) == len(intermediates) == 5  # stem and the four stages
        for hidden, intermediate in zip(features.hidden_states, intermediates):
            torch.testing.assert_close(hidden, intermediate, **TOL)
        torch.testing.assert_close(features.last_hidden_state, final, **TOL)
        torch.testing.assert_close(features.pooler_output, model.forward_head(final, pre_logits=True), **TOL)

    predictions = pipeline('image-classification', model=str(folder))(IMAGE, top_k=3)
    probabilities, indices = expected.softmax(dim=-1)[0].topk(3)
    assert [p['label'] for p in predictions] == [label_names[i] for i in indices]
    torch.testing.assert_close(torch.tensor([p['score'] for p in predictions]), probabilities, **TOL)


def test_classes_channels_and_pooling_survive_both_libraries(tmp_path):
    """The config must rebuild 10 classes, a one-channel stem and max pooling (which has no weights
    to give it away) in timm and in transformers alike."""
    torch.manual_seed(0)
    source = timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10, in_chans=1, global_pool='max')
    folder = _tiny_folder(tmp_path, 'gray', source)
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == 10
    assert config['model_args'] == {'layers': [1, 1, 1, 1], 'in_chans': 1, 'global_pool': 'max'}

    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(x), expected)
        torch.testing.assert_close(AutoModelForImageClassification.from_pretrained(folder).eval()(x).logits,
                                   expected, **TOL)


@pytest.fixture(scope='module')
def two_block_folder(tmp_path_factory):
    """A folder written for epsanet50 with two blocks in stage 1, one in each other stage."""
    torch.manual_seed(0)
    return _tiny_folder(tmp_path_factory.mktemp('two-blocks'), 'two-blocks',
                        timm.create_model('epsanet50', layers=(2, 1, 1, 1), num_classes=10))


@pytest.mark.parametrize('layers, report, count', [([1, 1, 1, 1], 'unexpected_keys', 25),
                                                   ([2, 2, 1, 1], 'missing_keys', 25)], ids=['fewer', 'more'])
def test_a_config_edited_away_from_its_weights_is_refused_before_it_is_published(
        two_block_folder, tmp_path, layers, report, count):
    """transformers loads such a folder, dropping weights or initialising layers at random, with a
    load report only (no plugin can make it strict): docs/clients.md says what to check
    (output_loading_info), and `push` refuses the folder before it reaches anyone."""
    folder = tmp_path / 'edited'
    shutil.copytree(two_block_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    model_args = {**config['model_args'], 'layers': layers}
    (folder / 'config.json').write_text(json.dumps({**config, 'model_args': model_args}))

    _, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert len(info[report]) == count and not any(info[k] for k in info if k != report)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{folder}/model.safetensors does not fit the epsanet50 that {folder}/config.json describes: {count} "
            f"{report.split('_')[0]}: ")) as error:
        push_folder(folder, 'org/two-blocks')
    assert error.match('make config.json describe the network the weights are for')


HUB_CLIENTS = textwrap.dedent("""
    import json, sys
    import numpy as np, safetensors.torch, torch
    from PIL import Image
    from transformers import (
        AutoImageProcessor, AutoModelForImageClassification, TimmWrapperModel, pipeline)

    repo, image_path, out = sys.argv[1:]
    image = Image.open(image_path)
    pixels = AutoImageProcessor.from_pretrained(repo)(image, return_tensors='pt')['pixel_values']
    with torch.no_grad():
        logits = AutoModelForImageClassification.from_pretrained(repo).eval()(pixels).logits
        pooled = TimmWrapperModel.from_pretrained(repo, output_hidden_states=True).eval()(pixels).pooler_output
    top = pipeline('image-classification', model=repo)(image, top_k=1)[0]
    registered_by_hook = 'timm_epsa' in sys.modules  # nothing above imports it
    import timm
    with torch.no_grad():
        timm_logits = timm.create_model('hf-hub:' + repo, pretrained=True).eval()(pixels)
    safetensors.torch.save_file(dict(pixels=pixels, logits=logits, pooled=pooled, timm_logits=timm_logits), out)
    print(json.dumps(dict(top=top, registered_by_hook=registered_by_hook)))
""")


@pytest.mark.slow
def test_transformers_loads_the_repo_from_the_hub(digits, hub, tmp_path, child_env):
    """``from_pretrained('<org>/<repo>')`` in a new interpreter whose ``HF_ENDPOINT`` is the loopback Hub."""
    folder, source = digits
    hub.serve('org/epsanet50.digits', folder)
    IMAGE.save(tmp_path / 'image.png')
    out = tmp_path / 'outputs.safetensors'
    env = {**child_env, **hub.env(tmp_path / 'hf-home')}
    result = subprocess.run(
        [sys.executable, '-c', HUB_CLIENTS, 'org/epsanet50.digits', str(tmp_path / 'image.png'), str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['registered_by_hook']

    outputs = safetensors.torch.load_file(out)
    with torch.no_grad():
        expected = source(outputs['pixels'])
        pooled = source.forward_head(source.forward_features(outputs['pixels']), pre_logits=True)
    torch.testing.assert_close(outputs['logits'], expected, **TOL)
    torch.testing.assert_close(outputs['timm_logits'], expected, **TOL)
    torch.testing.assert_close(outputs['pooled'], pooled, **TOL)
    probability, index = expected.softmax(dim=-1)[0].max(dim=0)
    assert report['top']['label'] == LABELS[index]
    assert abs(report['top']['score'] - probability.item()) < 1e-5
    assert {path.rsplit('/', 1)[-1] for _, path in hub.requests if '/resolve/' in path} >= \
        {'config.json', 'model.safetensors'}
