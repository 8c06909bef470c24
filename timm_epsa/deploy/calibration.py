"""The user's images an int8 export is calibrated on and checked against, preprocessed as the model's
own evaluation transform does (timm's ``resolve_data_config`` + ``create_transform``).

The images of a folder (an ImageFolder tree, ``DIR/<class>/*.png``, any depth, or a flat folder;
the extensions timm reads) are shuffled in a fixed order and split in two: up to
:data:`MAX_CALIBRATION` to calibrate the quantization on, and at least :data:`MIN_HELD_OUT` others
held out, on which the int8 model's top-1 predictions must agree with fp32's. Same folder, same
split, same file.
"""
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import torch
from PIL import Image
from timm.data import create_transform, get_img_extensions, resolve_data_config
from torch import nn

from ..escaping import first_line

__all__ = ['CalibrationImages', 'MAX_CALIBRATION', 'MAX_HELD_OUT', 'MIN_CALIBRATION', 'MIN_HELD_OUT',
           'calibration_images']

MIN_HELD_OUT = 100  # a 1% resolution for the top-1 agreement
MAX_HELD_OUT = 500  # checked on fp32 eager PyTorch too: bounds the check's time
MIN_CALIBRATION = 50  # below this the activation ranges come from too few images to trust
MAX_CALIBRATION = 300  # NNCF's default subset size; more changes the ranges little and costs time
_SPLIT_SEED = 0


@dataclass(frozen=True)
class CalibrationImages:
    """Image files of ``folder`` to calibrate on and to check on, read through ``transform``."""
    folder: Path
    calibration: Tuple[Path, ...]
    held_out: Tuple[Path, ...]
    transform: Callable[[Image.Image], torch.Tensor]

    def batches(self, paths: Sequence[Path], batch_size: int = 1) -> Iterator[torch.Tensor]:
        """``paths`` read and preprocessed, ``batch_size`` at a time."""
        for start in range(0, len(paths), batch_size):
            yield torch.stack([self._read(path) for path in paths[start:start + batch_size]])

    def _read(self, path: Path) -> torch.Tensor:
        with _opened(path, self.folder) as image:
            return self.transform(image.convert('RGB'))


def calibration_images(folder: Union[str, Path], model: nn.Module, input_size: Tuple[int, int, int]) -> CalibrationImages:
    """The images of ``folder`` split for calibration and the check, preprocessed for ``model`` at
    ``input_size`` (channels, height, width) with the model's data config; one-line ``ValueError``
    for a folder that is missing, unreadable or holds too few images."""
    folder = Path(folder)
    if input_size[0] != 3:
        raise ValueError(f'int8 calibration reads RGB images; this model takes {input_size[0]} input channels')
    paths = _image_files(folder)
    needed = MIN_CALIBRATION + MIN_HELD_OUT
    if len(paths) < needed:
        raise ValueError(
            f'{folder} holds {len(paths)} images ({", ".join(get_img_extensions())}); int8 needs at least {needed}: '
            f'{MIN_CALIBRATION} to calibrate on and {MIN_HELD_OUT} held out to check its predictions against fp32')
    random.Random(_SPLIT_SEED).shuffle(paths)
    held_out = min(MAX_HELD_OUT, max(MIN_HELD_OUT, len(paths) - MAX_CALIBRATION))
    paths = paths[:held_out + min(MAX_CALIBRATION, len(paths) - held_out)]
    for path in paths:  # a broken file is named now, not after minutes of export
        with _opened(path, folder) as image:
            image.verify()
    config = resolve_data_config({'input_size': tuple(input_size)}, model=model)
    transform = create_transform(**config, is_training=False)
    return CalibrationImages(folder, tuple(paths[held_out:]), tuple(paths[:held_out]), transform)


@contextmanager
def _opened(path: Path, folder: Path) -> Iterator[Image.Image]:
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's verify raises SyntaxError
        raise ValueError(f'calibration image {path} cannot be read ({first_line(e)}); remove it from {folder} or '
                         f'replace it') from None


def _image_files(folder: Path) -> List[Path]:
    """Every image file under ``folder``, sorted; unreadable folders are errors, not skipped."""
    if not folder.is_dir():
        raise ValueError(f'calibration folder {folder} ' + ('is not a folder' if folder.exists() else 'does not exist') +
                         ': give a folder of images (an ImageFolder tree or a flat folder)')
    extensions = set(get_img_extensions(as_set=True))

    def unreadable(error: OSError) -> None:
        raise ValueError(f'calibration folder {error.filename} cannot be read ({error.strerror or first_line(error)}); '
                         f'fix its permissions or give another folder')

    paths = []
    for root, _, files in os.walk(folder, onerror=unreadable, followlinks=True):
        paths.extend(Path(root) / name for name in files if os.path.splitext(name)[1].lower() in extensions)
    return sorted(paths)
