"""Writing a folder so that it appears whole or not at all.

Every folder the package writes (``convert``'s Hub folder, ``quickstart``'s model and ImageFolder)
is built in a hidden sibling and renamed into place once complete, so an interrupted run never
leaves a partial folder under the name a user or tool will read.
"""
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ['check_destination', 'staged_folder']


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse to write ``out_dir`` over something: a file, or a non-empty folder unless ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f'{out_dir} exists and is not a folder')
    if force or not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    raise FileExistsError(
        f'{out_dir} is not empty; pass --force to replace it (it is replaced only once the new folder is complete)')


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out_dir`` to write into, renamed to ``out_dir`` when the block
    completes (replacing what is there) and deleted if it raises: ``out_dir`` is only ever absent,
    the old folder whole, or the new one complete."""
    staging = _hidden_sibling(out_dir, 'partial')
    staging.mkdir(parents=True)
    try:
        yield staging
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted last."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = _hidden_sibling(out_dir, 'old')
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old)


def _hidden_sibling(out_dir: Path, suffix: str) -> Path:
    """A unique hidden path beside ``out_dir``: same filesystem, so renames between them are atomic."""
    return out_dir.with_name(f'.{out_dir.name}.{uuid.uuid4().hex[:8]}.{suffix}')
