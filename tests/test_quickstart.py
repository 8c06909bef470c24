"""``timm-epsa quickstart``: trains on the digits, exports, reloads identically; fine-tuning with timm's factories."""
import json
import sys

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from timm.data import create_dataset, resolve_data_config

import timm_epsa  # noqa: F401  registers the models
from cli_run import assert_one_line_error, run_cli
from timm_epsa import cli, quickstart
from timm_epsa.quickstart import (
    HELD_OUT, LABELS, QuickstartError, Recipe, create_digits_model, create_loaders, create_training, load_digits_split,
    predict, run_quickstart, train_one_epoch,
)

# One epoch on a batch of 64 images at 16x16: seconds, and every step of the real run.
TINY = Recipe(epochs=1, img_size=16, train_images=64)
TINY_ARGS = ['--epochs', '1', '--img-size', '16', '--train-images', '64']
FOLDER_FILES = ['README.md', 'config.json', 'model.safetensors']


@pytest.fixture(scope='module')
def digits():
    return load_digits_split()


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """(result, ImageFolder root) of a short quickstart run that also wrote the ImageFolder tree."""
    root = tmp_path_factory.mktemp('quickstart')
    result = run_quickstart(root / 'run', TINY, imagefolder=root / 'digits')
    return result, root / 'digits'


def run_quickstart_cli(capsys, *args):
    return run_cli(capsys, 'quickstart', *args)


def held_out_logits(model, recipe, digits):
    """Held-out logits the way the quickstart computes them (its transforms, channels_last)."""
    train, held_out = digits
    _, eval_loader = create_loaders(resolve_data_config({}, model=model), recipe, train, held_out)
    return predict(model.to(memory_format=torch.channels_last), eval_loader)[0]


def test_run_exports_a_folder_that_reloads_to_identical_logits(tiny_run, digits):
    result, _ = tiny_run
    assert sorted(p.name for p in result.path.iterdir()) == FOLDER_FILES
    assert [p.name for p in result.path.parent.iterdir() if p.name.startswith('.')] == []  # no staging left
    assert result.logits.shape == (HELD_OUT, len(LABELS))
    assert torch.equal(result.logits, result.reloaded_logits)
    assert result.accuracy == result.reloaded_accuracy

    # loaded again here, by the other route users have: config.json through 'local-dir:'
    reloaded = timm.create_model(f'local-dir:{result.path}', pretrained=True).eval()
    assert torch.equal(held_out_logits(reloaded, TINY, digits), result.logits)

    config = json.loads((result.path / 'config.json').read_text())
    assert (config['architecture'], config['num_classes']) == ('epsanet50', 10)
    cfg = config['pretrained_cfg']
    assert (cfg['input_size'], cfg['crop_pct'], cfg['num_classes'], cfg['label_names']) == \
        ([3, 16, 16], 1.0, 10, list(LABELS))

    card = ModelCard.load(result.path / 'README.md')
    assert card.data.datasets is None  # the digits are no Hub dataset
    evaluation, = card.data.eval_results
    assert (evaluation.dataset_type, evaluation.metric_value) == ('sklearn-digits', round(100 * result.accuracy, 2))
    for text in ("trained on scikit-learn's handwritten digits", 'held-out (360 images) set at 16x16',
                 'timm-epsa quickstart --epochs 1 --img-size 16 --seed 0 --train-images 64', '(1, 10) logits'):
        assert text in card.text, text


def test_a_reloaded_model_that_differs_fails_and_writes_nothing(tmp_path, monkeypatch):
    """Logits, not only accuracy: a classifier bias shifted by one keeps every prediction but is refused."""
    def create_shifted(recipe, **kwargs):
        model = create_digits_model(recipe, **kwargs)
        if kwargs.get('pretrained'):
            with torch.no_grad():
                model.fc.bias += 1
        return model
    monkeypatch.setattr(quickstart, 'create_digits_model', create_shifted)
    with pytest.raises(QuickstartError, match='does not compute what was trained: held-out accuracy'):
        run_quickstart(tmp_path / 'run', TINY)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_a_run_with_an_identical_one_and_the_seed_matters(tiny_run, capsys, tmp_path):
    result, _ = tiny_run
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'old.txt').write_text('old')
    status, stdout, err = run_quickstart_cli(capsys, '--output', out, '--force', *TINY_ARGS)
    assert status == 0, err
    assert stdout.splitlines()[-1] == f'held-out accuracy: {result.reloaded_accuracy:.4f}'
    assert 'epoch 1/1  loss ' in err
    assert sorted(p.name for p in out.iterdir()) == FOLDER_FILES
    assert [p.name for p in tmp_path.iterdir()] == ['run']
    for name in FOLDER_FILES:  # deterministic: the same seed makes the same files
        assert (out / name).read_bytes() == (result.path / name).read_bytes(), name

    status, _, err = run_quickstart_cli(capsys, '--output', tmp_path / 'seed1', '--seed', '1', *TINY_ARGS)
    assert status == 0, err
    assert (tmp_path / 'seed1' / 'model.safetensors').read_bytes() != (out / 'model.safetensors').read_bytes()


def test_imagefolder_holds_the_digits_for_timm(tiny_run, digits):
    _, root = tiny_run
    for split, expected in zip(('train', 'validation'), digits):
        assert sorted(p.name for p in (root / split).iterdir()) == list(LABELS)
        counts = [len(list((root / split / label).glob('*.png'))) for label in LABELS]
        assert counts == np.bincount(expected.targets, minlength=10).tolist()

        dataset = create_dataset('', root=str(root), split=split)  # as train.py reads --data-dir
        assert len(dataset) == len(expected)
        assert dataset.reader.class_to_idx == {label: i for i, label in enumerate(LABELS)}
        image, target = dataset[0]  # the lowest index of class 0; PNG keeps every pixel
        first = np.flatnonzero(expected.targets == 0)[0]
        assert target == 0
        assert np.array_equal(np.asarray(image.convert('L')), expected.images[first])
    assert sum(1 for _ in root.rglob('*.png')) == 1797
    held_out = {int(p.stem) for p in (root / 'validation').rglob('*.png')}
    assert held_out == set(digits[1].indices.tolist()) and len(held_out) == HELD_OUT
    with Image.open(next(root.rglob('*.png'))) as png:
        assert png.size == (8, 8)  # the originals, not upsampled


def test_fine_tuning_with_timm_factories_and_grad_checkpointing_lowers_the_loss(digits, monkeypatch):
    """create_optimizer_v2 / create_scheduler_v2 / timm.loss as the quickstart makes them, on a shallow
    EPSANet with gradient checkpointing, fitting one batch of real digits."""
    checkpoint_seq, checkpointed = timm.models.resnet.checkpoint_seq, []

    def counting_checkpoint_seq(*args, **kwargs):
        checkpointed.append(1)
        return checkpoint_seq(*args, **kwargs)
    monkeypatch.setattr(timm.models.resnet, 'checkpoint_seq', counting_checkpoint_seq)

    recipe = Recipe(epochs=3, img_size=16, batch_size=32, warmup_epochs=0)
    train, held_out = digits
    torch.manual_seed(0)
    model = create_digits_model(recipe, layers=(1, 1, 1, 1)).to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(True)
    loader, _ = create_loaders(resolve_data_config({}, model=model), recipe, train.head(32), held_out)
    batches = [next(iter(loader))] * 6
    optimizer, scheduler, loss_fn = create_training(model, recipe, updates_per_epoch=len(batches))
    losses = [train_one_epoch(model, batches, optimizer, scheduler, loss_fn, epoch) for epoch in range(recipe.epochs)]
    assert len(checkpointed) == recipe.epochs * len(batches)
    assert losses[-1] < 0.5 * losses[0], losses
    assert optimizer.param_groups[0]['lr'] < 0.1 * recipe.lr  # the cosine schedule ran to its end


def test_refuses_to_overwrite_a_previous_run_without_force(capsys, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'model.safetensors').write_text('previous run')
    status, _, err = run_quickstart_cli(capsys, '--output', out)
    assert status == 1
    assert_one_line_error(err, 'quickstart', f'{out} is not empty; pass --force')

    status, _, err = run_quickstart_cli(capsys, '--output', tmp_path / 'new', '--imagefolder', out)
    assert status == 1
    assert_one_line_error(err, 'quickstart', f'{out} is not empty; pass --force')
    assert [p.name for p in tmp_path.iterdir()] == ['run']
    assert (out / 'model.safetensors').read_text() == 'previous run'


@pytest.mark.parametrize('args, message', [
    (['--epochs', '0'], 'argument --epochs: 0 is less than 1'),
    (['--epochs', 'ten'], "argument --epochs: 'ten' is not a whole number"),
    (['--img-size', '4'], 'argument --img-size: 4 is less than 8'),
    (['--img-size', '4096'], 'argument --img-size: 4096 is more than 1024'),
    (['--seed', '-1'], 'argument --seed: -1 is less than 0'),
    (['--train-images', '0'], 'argument --train-images: 0 is less than 1'),
    (['--output', 'same', '--imagefolder', 'same/digits'], 'must be apart, not one inside the other'),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    try:
        status = cli.main(['quickstart', *args])
    except SystemExit as e:  # argparse's own errors: usage, then the error line
        status = e.code
    assert status in (1, 2)
    assert_one_line_error(capsys.readouterr().err, 'quickstart', message)
    assert list(tmp_path.iterdir()) == []


def test_without_scikit_learn_it_says_what_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)  # makes the import fail
    status, _, err = run_quickstart_cli(capsys, '--output', tmp_path / 'run')
    assert status == 1
    assert_one_line_error(err, 'quickstart', "pip install 'timm-epsa[quickstart]'")
    assert list(tmp_path.iterdir()) == []
