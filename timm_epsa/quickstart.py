"""``timm-epsa quickstart``: train EPSANet on real images on a CPU, publish it as a Hub folder, load it back.

The images are scikit-learn's handwritten digits (1,797 8x8 grey images of 10 classes, installed
with scikit-learn, so nothing is downloaded), upsampled by timm's transforms to ``img_size``, with
a fixed held-out split. Every step is timm's own: the model by name, ``timm.data``'s transforms and
loader, ``create_optimizer_v2``, ``create_scheduler_v2``, ``timm.loss``. No EPSANet weights exist
anywhere, so training starts from random initialisation.

The trained model is written by the code behind ``timm-epsa convert`` (:func:`write_hub_folder`)
and loaded back the way a user loads it, ``pretrained=True`` with ``pretrained_cfg_overlay=dict(
file=...)``; its held-out logits must equal the trained model's exactly before the folder takes its
final name, so a folder that appears is one that reloads as trained.
"""
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from timm.data import create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import accuracy, random_seed

from . import __version__
from .hub import WEIGHTS_NAME
from .hub.cards import CardDataset
from .hub.folder import write_hub_folder
from .hub.repos import hub_repo_id
from .staging import destination_path, staged_folder

__all__ = [
    'DEFAULT_OUTPUT', 'MODEL_NAME', 'QuickstartError', 'QuickstartResult', 'Recipe', 'create_digits_model',
    'create_loaders', 'create_training', 'load_digits_split', 'predict', 'run_quickstart', 'train_one_epoch',
    'write_imagefolder',
]

MODEL_NAME = 'epsanet50'  # the smallest registered variant
DEFAULT_OUTPUT = 'epsanet-quickstart'
LABELS = tuple(str(digit) for digit in range(10))
HELD_OUT = 360  # images, stratified; the split never moves with the seed, so runs stay comparable
SPLIT_SEED = 0
SPLITS = ('train', 'validation')  # the ImageFolder split names timm's train.py looks for by default
DIGITS = CardDataset(
    name="scikit-learn's handwritten digits (`sklearn.datasets.load_digits`)",
    id='sklearn-digits',
    split=f'held-out ({HELD_OUT} images)',
    on_hub=False,
)
_EVAL_BATCH_SIZE = 128


class QuickstartError(RuntimeError):
    """The quickstart cannot run here, or what it wrote does not load back as the model it trained."""


@dataclass(frozen=True)
class Recipe:
    """How the quickstart trains; the fields are named after timm's train.py flags where it has one."""
    epochs: int = 8
    img_size: int = 32
    seed: int = 0
    batch_size: int = 64
    opt: str = 'adamw'
    lr: float = 4e-3
    weight_decay: float = 0.05
    sched: str = 'cosine'
    warmup_epochs: int = 1
    smoothing: float = 0.1
    scale: Tuple[float, float] = (0.75, 1.0)  # of the random resized crop
    train_images: Optional[int] = None  # train on the first N training images only (a smoke test)


@dataclass
class Digits:
    """Images as uint8 (N, 8, 8) arrays, their classes, and their index in ``load_digits()``."""
    images: np.ndarray
    targets: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def head(self, count: Optional[int]) -> 'Digits':
        return Digits(self.images[:count], self.targets[:count], self.indices[:count])


@dataclass
class QuickstartResult:
    path: Path
    repo_id: str  # the Hub repo the model card is written for
    accuracy: float  # held-out accuracy of the model as trained
    reloaded_accuracy: float  # of the model loaded back from ``path``
    logits: torch.Tensor  # held-out logits as trained
    reloaded_logits: torch.Tensor


class DigitsDataset(Dataset):
    """The digits as the RGB PIL images an ImageFolder of them yields to timm; ``transform`` is set
    by ``timm.data.create_loader``, as for timm's own datasets."""

    def __init__(self, digits: Digits):
        self.digits = digits
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = Image.fromarray(self.digits.images[index], 'L').convert('RGB')
        return self.transform(image), int(self.digits.targets[index])


def load_digits_split() -> Tuple[Digits, Digits]:
    """(train, held-out): the 1,797 digits split once and for all, stratified by class."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise QuickstartError(
            "the quickstart's images come with scikit-learn, which is not installed: "
            "pip install 'timm-epsa[quickstart]'") from e
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # grey levels 0..16 as 8-bit pixels
    indices = np.arange(len(images))
    train, held_out = train_test_split(
        indices, test_size=HELD_OUT, stratify=digits.target, random_state=SPLIT_SEED)
    return tuple(Digits(images[i], digits.target[i], i) for i in (np.sort(train), np.sort(held_out)))


def write_imagefolder(root: Path, train: Digits, held_out: Digits) -> None:
    """``root/train/<class>/<index>.png`` and ``root/validation/...``: the 8x8 images as they are, for
    timm's train.py and ``create_dataset``, which upsample them as the quickstart does."""
    for split, digits in zip(SPLITS, (train, held_out)):
        for label in LABELS:
            (root / split / label).mkdir(parents=True)
        for image, target, index in zip(digits.images, digits.targets, digits.indices):
            Image.fromarray(image, 'L').save(root / split / LABELS[target] / f'{index:04d}.png')


def create_digits_model(recipe: Recipe, **kwargs) -> nn.Module:
    """EPSANet for the digits. Its pretrained cfg says how it sees them (size, crop, labels), so that
    ``resolve_data_config`` gives the quickstart's transforms and config.json records them.

    ``zero_init_last`` (timm's ResNet default, not the official EPSANet init) starts every residual
    block as the identity, which trains the 50 layers from scratch on 1,437 images in half the epochs.
    """
    overlay = dict(
        tag='digits',
        input_size=(3, recipe.img_size, recipe.img_size),
        pool_size=None,  # depends on the input size
        crop_pct=1.0,
        interpolation='bilinear',
        num_classes=len(LABELS),
        label_names=LABELS,
        **kwargs.pop('pretrained_cfg_overlay', {}),
    )
    return timm.create_model(
        MODEL_NAME, num_classes=len(LABELS), zero_init_last=True, pretrained_cfg_overlay=overlay, **kwargs)


def create_loaders(data_config: Dict, recipe: Recipe, train: Digits, held_out: Digits) -> Tuple[DataLoader, DataLoader]:
    """timm's loaders and transforms: a random resized crop for training (no flips or colour jitter,
    which digits do not have), a plain resize for evaluation. Loading stays in this process: the
    images are tiny, and a worker would only take CPU from the model."""
    common = dict(
        input_size=data_config['input_size'],
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        num_workers=0,
        use_prefetcher=False,
    )
    train_loader = create_loader(
        DigitsDataset(train),
        batch_size=min(recipe.batch_size, len(train)),
        is_training=True,
        scale=recipe.scale,
        hflip=0.,
        color_jitter=0.,
        **common,
    )
    eval_loader = create_loader(
        DigitsDataset(held_out),
        batch_size=_EVAL_BATCH_SIZE,
        crop_pct=data_config['crop_pct'],
        **common,
    )
    return train_loader, eval_loader


def create_training(
        model: nn.Module,
        recipe: Recipe,
        updates_per_epoch: int,
) -> Tuple[torch.optim.Optimizer, Scheduler, nn.Module]:
    """Optimizer, per-update learning-rate schedule and loss, from timm's factories as train.py makes them."""
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler, LabelSmoothingCrossEntropy(recipe.smoothing)


def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler,
        loss_fn: nn.Module,
        epoch: int,
) -> float:
    """One pass over ``loader``, the learning rate scheduled per update; the mean loss."""
    model.train()
    total, updates = 0., epoch * len(loader)
    for images, targets in loader:
        loss = loss_fn(model(images.contiguous(memory_format=torch.channels_last)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updates += 1
        scheduler.step_update(num_updates=updates)
        total += loss.item()
    return total / len(loader)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of ``loader``'s images, in order."""
    model.eval()
    outputs, targets = zip(*((model(x.contiguous(memory_format=torch.channels_last)), y) for x, y in loader))
    return torch.cat(outputs), torch.cat(targets)


def top1(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction, as the quickstart reports it (timm's ``accuracy`` gives percent)."""
    return accuracy(logits, targets, topk=(1,))[0].item() / 100


def run_quickstart(
        out_dir: Union[str, Path] = DEFAULT_OUTPUT,
        recipe: Recipe = Recipe(),
        imagefolder: Union[None, str, Path] = None,
        force: bool = False,
        log: Optional[Callable[[str], None]] = None,
) -> QuickstartResult:
    """Train :data:`MODEL_NAME` on the digits, write it to ``out_dir`` as a Hub-ready folder, load it
    back and check it computes what was trained.

    Both folders are locked from the start (a non-empty one is refused before training) and each is
    replaced only once complete (:func:`timm_epsa.staging.staged_folder`).

    Args:
        recipe: epochs, image size, seed and the rest of the training setup.
        imagefolder: also write the digits there as an ImageFolder tree, for timm's train.py.
        force: replace a non-empty ``out_dir`` / ``imagefolder``, once the new one is complete.
        log: receives the progress, one line at a time, and what was done beyond it.
    """
    out_dir = Path(out_dir)
    imagefolder = Path(imagefolder) if imagefolder is not None else None
    if imagefolder is not None:
        _check_apart(out_dir, imagefolder)
    with ExitStack() as stack:
        staging = stack.enter_context(staged_folder(out_dir, force=force, log=log))
        images = stack.enter_context(staged_folder(imagefolder, force=force, log=log)) if imagefolder else None
        return _run(out_dir, staging, images, imagefolder, recipe, log or (lambda message: None))


def _run(
        out_dir: Path,
        staging: Path,
        images: Optional[Path],
        imagefolder: Optional[Path],
        recipe: Recipe,
        log: Callable[[str], None],
) -> QuickstartResult:
    repo_id = hub_repo_id(MODEL_NAME, tag='digits')
    train, held_out = load_digits_split()
    if images is not None:
        log(f'writing the digits as an ImageFolder tree to {imagefolder}')
        write_imagefolder(images, train, held_out)
    train = train.head(recipe.train_images)

    random_seed(recipe.seed)
    model = create_digits_model(recipe).to(memory_format=torch.channels_last)  # the faster layout on CPU
    data_config = resolve_data_config({}, model=model)
    train_loader, eval_loader = create_loaders(data_config, recipe, train, held_out)
    optimizer, scheduler, loss_fn = create_training(model, recipe, len(train_loader))
    log(f'training {MODEL_NAME} from random initialisation on {len(train)} digits at '
        f'{recipe.img_size}x{recipe.img_size} for {recipe.epochs} epochs; {len(held_out)} held out')
    for epoch in range(recipe.epochs):
        start = time.perf_counter()
        loss = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, epoch)
        logits, targets = predict(model, eval_loader)
        log(f'epoch {epoch + 1}/{recipe.epochs}  loss {loss:.4f}  held-out accuracy {top1(logits, targets):.4f}  '
            f'({time.perf_counter() - start:.1f} s)')

    trained_accuracy = top1(logits, targets)
    log(f'writing {out_dir}')
    write_hub_folder(
        model.to(memory_format=torch.contiguous_format),  # safetensors stores contiguous tensors
        staging,
        repo_id,
        top1=round(100 * trained_accuracy, 2),
        dataset=DIGITS,
        weights=_describe_run(recipe, len(train)),
        log=log,
    )
    log(f'loading it back with pretrained=True, pretrained_cfg_overlay=dict(file=.../{WEIGHTS_NAME}), '
        f'comparing its held-out logits')
    overlay = dict(file=str(staging / WEIGHTS_NAME))
    reloaded = create_digits_model(recipe, pretrained=True, pretrained_cfg_overlay=overlay)
    reloaded_logits, _ = predict(reloaded.to(memory_format=torch.channels_last), eval_loader)
    _check_reloaded(logits, reloaded_logits, targets)
    return QuickstartResult(
        path=out_dir,
        repo_id=repo_id,
        accuracy=trained_accuracy,
        reloaded_accuracy=top1(reloaded_logits, targets),
        logits=logits,
        reloaded_logits=reloaded_logits,
    )


def _check_apart(out_dir: Path, imagefolder: Path) -> None:
    """Refuse to write one folder twice, or one inside the other (replacing one would replace both)."""
    a, b = destination_path(out_dir), destination_path(imagefolder)
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(
            f'the output folder {out_dir} and the ImageFolder {imagefolder} must be apart, not one inside the other')


def _check_reloaded(logits: torch.Tensor, reloaded: torch.Tensor, targets: torch.Tensor) -> None:
    if not torch.equal(logits, reloaded):
        raise QuickstartError(
            f'the model loaded back does not compute what was trained: held-out accuracy '
            f'{top1(reloaded, targets):.4f} reloaded vs {top1(logits, targets):.4f} trained, '
            f'logits differ by up to {(logits - reloaded).abs().max().item():.3g}')


def _describe_run(recipe: Recipe, train_images: int) -> str:
    command = f'timm-epsa quickstart --epochs {recipe.epochs} --img-size {recipe.img_size} --seed {recipe.seed}'
    if recipe.train_images:
        command += f' --train-images {recipe.train_images}'
    return (
        f'trained from random initialisation by `{command}` (timm-epsa {__version__}) on {train_images} training '
        f'images at {recipe.img_size}x{recipe.img_size}: {recipe.opt} lr {recipe.lr:g}, weight decay '
        f'{recipe.weight_decay:g}, {recipe.sched} schedule, batch size {recipe.batch_size}, label smoothing '
        f'{recipe.smoothing:g}'
    )
