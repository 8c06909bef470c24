"""Writing outputs so that they appear whole or not at all, and nothing a user had is lost.

Every folder the package writes (``convert``'s Hub folder, ``quickstart``'s model and ImageFolder,
``export``'s OpenVINO IR) and every file (``export``'s ONNX file) is built in a hidden sibling of its
destination and moved into place once complete:

* **One writer at a time.** The destination is locked for the whole run with ``flock`` on a hidden
  ``.<name>.timm-epsa.lock`` beside it, which holds the writer's pid and is deleted when the run
  ends: a second timm-epsa writing there is refused at once, naming the first one's pid.
* **Old or new, never neither.** A folder takes its destination's place by one
  ``renameat2(RENAME_EXCHANGE)`` where the OS offers it (Linux 3.15+, most local filesystems), so
  the destination is at every instant the complete old folder or the complete new one. Elsewhere
  the old folder is first renamed aside and, should the run die between the two renames, put back
  by the next run. A file takes its place by one ``rename``. SIGINT and SIGTERM are held back while
  the destination changes and delivered right after, so an interrupt never splits the swap.
* **Nothing replaced without force.** A destination that is not empty is refused unless ``force``,
  and one that fills up while the run works is left as it is (the check is repeated under the lock
  and the swap itself refuses to replace anything but an empty folder).
* **Never through a link.** A symbolic link at the destination is refused, ``force`` or not, naming
  where it points: writing there would replace what the link points to (a checkpoint, someone's
  folder), replacing the link would surprise whoever made it, and either way the user's intent is
  a guess. Folders on the way to the destination may be links; a dangling one is refused rather
  than followed, so that no folder is ever created where a link points.
* **Modes as the umask says.** What a run wrote gets the modes every other tool's new files get
  (``0o666`` less the umask, folders ``0o777``), whatever its writer chose: safetensors writes its
  files ``0o600``, which would leave weights in a shared folder that nobody else can read.
* **Leftovers of killed runs** (``.<name>.<8 hex>.partial``, ``.old``) are cleaned up or put back
  by the next run writing the same destination, which says what it did.

The environment variable :data:`PAUSE_ENV` exists for the tests only: it stops a run at a named step
until a signal arrives, so that a test can interrupt or kill it exactly there.
"""
import ctypes
import errno
import hashlib
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from .escaping import utf8_path_problem

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

__all__ = ['DestinationError', 'PAUSE_ENV', 'destination_path', 'staged_file', 'staged_folder']

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

PAUSE_ENV = 'TIMM_EPSA_TEST_PAUSE'  # test-only: a step name (see _pause_for_tests)
_NAME_MAX = 255  # bytes in a file name on every common filesystem
_STEM_MAX = 200  # bytes of the destination's name kept in its hidden siblings' names, which then fit in 255
_LEFTOVER_KINDS = ('old', 'partial')  # in the order the next run handles them
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
# renameat2, or a flag of it, that the OS or the filesystem does not have
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class DestinationError(OSError):
    """A destination cannot be written as asked; the message says why and what to do."""


@contextmanager
def staged_folder(out_dir: PathLike, force: bool = False, log: Optional[Log] = None) -> Iterator[Path]:
    """Lock ``out_dir``, and yield a new empty hidden folder beside it to write into, which replaces
    ``out_dir`` when the block completes and is deleted if it raises.

    ``log`` receives what the run did beyond writing (a killed run's leftovers cleaned up, an old
    folder that could not be deleted); without one these are ``RuntimeWarning``\\ s.

    Raises :class:`DestinationError` when ``out_dir`` is being written by another timm-epsa, is not
    empty (unless ``force``) or became so while the block ran, is a symbolic link, or cannot be a
    destination at all.
    """
    with _writing(out_dir, force, log, folder=True) as staging:
        yield staging


@contextmanager
def staged_file(out: PathLike, force: bool = False, log: Optional[Log] = None) -> Iterator[Path]:
    """Lock the file ``out`` and yield a hidden path beside it to write the new file to, which
    replaces ``out`` by one ``rename`` when the block completes (so ``out`` is always the complete
    old or new file) and is deleted if it raises. A format of several files that belong together
    is written as a folder (:func:`staged_folder`), which is replaced as a whole."""
    with _writing(out, force, log, folder=False) as staging:
        yield staging / Path(out).name


def destination_path(out: PathLike) -> Path:
    """The absolute path a destination ``out`` names: the folder it is in resolved (links on the way
    followed), its own name kept, so that a link of that name is the destination itself, never
    followed. Every check that compares an output's path with another (an OUT inside SOURCE) uses it."""
    given = Path(out)
    if given.name in ('', '..'):  # '/', '.', 'a/..': a folder named by where it is, not a name in one
        return Path(os.path.realpath(given))
    return Path(os.path.realpath(given.parent)) / given.name


class _Destination:
    """Where an output goes, resolved, with the user's spelling of it for messages."""

    def __init__(self, path: PathLike):
        self.shown = str(path)
        problem = utf8_path_problem(self.shown)
        if problem:
            raise DestinationError(f'{problem}; choose another name')
        dangling = next((p for p in Path(path).parents if p.is_symlink() and not p.exists()), None)
        if dangling is not None:
            raise DestinationError(
                f'{self.shown}: the folder {dangling} on the way to it is a symbolic link to '
                f'{os.path.realpath(dangling)}, which does not exist; timm-epsa creates no folder where a link points: '
                f'create that folder, or write elsewhere')
        self.path = destination_path(path)
        name = self.path.name.encode('utf-8')
        if not name:
            raise DestinationError(f'{self.shown} names no file or folder to write; give the name of one')
        if len(name) > _NAME_MAX:
            raise DestinationError(
                f'{self.shown}: the name is {len(name)} bytes long, more than the {_NAME_MAX} a file name can have')
        here = Path(os.path.realpath(os.getcwd()))
        if self.path == here or self.path in here.parents:
            raise DestinationError(
                f'{self.shown} is the current folder or holds it, which cannot be replaced; run from outside it, '
                f'or write to another folder')
        stem = name.decode('utf-8')
        if len(name) > _STEM_MAX:  # a prefix, plus a digest of the whole name to keep it unique
            stem = name[:_STEM_MAX - 9].decode('utf-8', 'ignore') + '~' + hashlib.sha256(name).hexdigest()[:8]
        self._stem = stem
        self.lock = self.path.with_name(f'.{stem}.timm-epsa.lock')
        self._leftover = re.compile(rf'\.{re.escape(stem)}\.[0-9a-f]{{8}}\.({"|".join(_LEFTOVER_KINDS)})')

    def sibling(self, kind: str, token: str) -> Path:
        """A hidden path beside the destination, on its filesystem, so that renames are atomic; one run
        names all of its siblings with one ``token``, which tells the next run what belongs together."""
        return self.path.with_name(f'.{self._stem}.{token}.{kind}')

    def leftovers(self) -> List[Path]:
        """Hidden siblings a run writing this destination made and did not remove, in handling order."""
        try:
            found = [(m.group(1), p) for p in self.path.parent.iterdir() if (m := self._leftover.fullmatch(p.name))]
        except FileNotFoundError:
            return []
        return [p for kind, p in sorted(found, key=lambda kp: (_LEFTOVER_KINDS.index(kp[0]), kp[1].name))]


@contextmanager
def _writing(out: PathLike, force: bool, log: Optional[Log], folder: bool) -> Iterator[Path]:
    """Lock ``out``, handle leftovers, check it, and yield a hidden staging folder; on success move the
    result into place (the folder itself, or the file of ``out``'s name in it)."""
    log = _warn if log is None else log
    dest = _Destination(out)
    created = _make_parents(dest.path.parent)
    try:
        with _locked(dest):
            _handle_leftovers(dest, log)
            _check_destination(dest, force, folder)
            token = uuid.uuid4().hex[:8]
            staging = dest.sibling('partial', token)
            staging.mkdir()
            committed = False
            try:
                _pause_for_tests('staging')
                yield staging
                _follow_umask(staging)
                with _signals_held() as received:
                    _pause_for_tests('commit')
                    if folder:
                        _commit_folder(staging, dest, force, token, log)
                    else:
                        _commit_file(staging / Path(out).name, dest, force)
                        _remove(staging, log=log)
                    committed = True
                    if received:
                        log(f'{dest.shown} was written completely before the interrupt took effect')
            except BaseException as e:
                if committed:  # an interrupt held back during the swap: the new output stands
                    raise
                _remove(staging, log=log, missing_ok=True)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    state = 'is unchanged' if os.path.lexists(dest.path) else 'was not written'
                    raise DestinationError(
                        f'no space left on the device for {dest.shown} ({e.strerror}); {dest.shown} {state}: free '
                        f'some space or write it elsewhere') from e
                raise
    except BaseException:
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; the ones created, deepest first, to remove on failure."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for parent in reversed(missing):
        parent.mkdir(exist_ok=True)
    return missing


def _follow_umask(root: Path) -> None:
    """Give the files and folders under ``root`` the modes the umask gives new ones; links are left as they are."""
    umask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _umask() -> int:
    """The process's umask, read from /proc where Linux shows it (setting it to read it, the only other
    way, would change it for a moment for every thread creating files)."""
    try:
        with open('/proc/self/status', encoding='ascii') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _check_destination(dest: _Destination, force: bool, folder: bool, while_writing: bool = False) -> None:
    """Refuse a symbolic link, a destination of the wrong kind, or one that is not empty unless ``force``."""
    if not os.path.lexists(dest.path):
        return
    if dest.path.is_symlink():
        target = os.path.realpath(dest.path)
        missing = '' if dest.path.exists() else ', which does not exist'
        raise DestinationError(
            f'{dest.shown} is a symbolic link to {target}{missing}: timm-epsa neither writes through a link nor '
            f'replaces one, --force or not; give {target} to write there, or remove the link')
    if folder != dest.path.is_dir():
        kind, wanted = ('a file', 'a folder') if folder else ('a folder', 'a file')
        raise DestinationError(f'{dest.shown} is {kind}, and {wanted} was to be written there; remove it or choose '
                               f'another name')
    if folder and os.path.ismount(dest.path):
        raise DestinationError(f'{dest.shown} is a mount point, which cannot be replaced; write to a folder inside it')
    if force or (folder and not any(dest.path.iterdir())):
        return
    what = 'is not empty' if folder else 'exists'
    if while_writing:
        raise DestinationError(
            f'{dest.shown} {"was filled" if folder else "was created"} while timm-epsa was writing it: it is left as '
            f'it is and the new one discarded; pass --force to replace it')
    raise DestinationError(f'{dest.shown} {what}; pass --force to replace it (only once the new one is complete)')


@contextmanager
def _locked(dest: _Destination) -> Iterator[None]:
    """Hold the destination's lock file: exclusively, for the block, removed afterwards."""
    while True:
        try:
            fd = os.open(dest.lock, os.O_RDWR | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:  # never write through a link planted where the lock goes
                raise DestinationError(
                    f'{dest.lock} is a symbolic link, where timm-epsa keeps the lock of {dest.shown}; remove it') from e
            raise DestinationError(
                f'cannot write in {dest.path.parent}, where {dest.shown} goes ({e.strerror or e}): choose a folder '
                f'you can write to') from e
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode('ascii', 'replace').strip()
            os.close(fd)
            pid = f' (pid {holder})' if holder.isdigit() else ''
            raise DestinationError(
                f'{dest.shown} is being written by another timm-epsa{pid}; wait for it to finish, or stop it')
        try:
            if os.path.samestat(os.fstat(fd), os.stat(dest.lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed the file as this run opened it: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode('ascii'))
        yield
    finally:
        # Removed while still held: a run that opened it meanwhile finds it is no longer the lock file.
        try:
            os.unlink(dest.lock)
        except OSError:
            pass
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _handle_leftovers(main: _Destination, log: Log) -> None:
    """Clean up after runs that were killed (nothing else leaves these: it holds the lock now).

    An ``.old`` is the destination's previous content, moved aside by a run replacing it with
    ``force``. Where the destination is missing it is put back. Where the destination exists and
    the same run's ``.partial`` is still there, that run was killed before the new content took the
    place, so the destination is someone else's since: the ``.old`` is kept and reported, never
    deleted. Without its ``.partial`` the replacement was done, and the ``.old`` is what it replaced.
    """
    leftovers = main.leftovers()
    unfinished = {_token(p) for p in leftovers if p.suffix == '.partial'}
    for leftover in leftovers:
        kind = leftover.suffix[1:]
        if kind == 'old' and not os.path.lexists(main.path):
            os.rename(leftover, main.path)
            log(f'{main.shown} was missing: put back the previous {main.shown} from {leftover.name}, where a '
                f'timm-epsa run that was killed had moved it aside')
            continue
        if kind == 'old' and _token(leftover) in unfinished:
            log(f'warning: {leftover} holds the previous {main.shown}, moved aside by a timm-epsa run that was '
                f'killed before replacing it; {main.shown} exists again, so it is kept there: move it back or '
                f'delete it yourself')
            continue
        if _remove(leftover, log=log):
            what = (f'what {main.shown} held before a timm-epsa run that was killed replaced it' if kind == 'old'
                    else 'the unfinished output (or the replaced content) of a timm-epsa run that was killed')
            log(f'removed {leftover.name} beside {main.shown}: {what}')


def _token(leftover: Path) -> str:
    """The token of the run that made a hidden sibling (see :meth:`_Destination.sibling`)."""
    return leftover.name.rsplit('.', 2)[-2]


def _commit_folder(staging: Path, dest: _Destination, force: bool, token: str, log: Log) -> None:
    """Put the folder ``staging`` in ``dest``'s place and delete what was there (``force`` only)."""
    _check_destination(dest, force, folder=True, while_writing=True)
    if not force or not os.path.lexists(dest.path):
        _rename_no_replace(staging, dest, folder=True)
        return
    try:
        _renameat2(staging, dest.path, _RENAME_EXCHANGE)
    except _Unsupported:
        _move_aside_and_in(staging, dest, token, log)
        return
    _remove_previous(staging, dest, log)  # ``staging`` now holds what was in ``dest``


def _move_aside_and_in(staging: Path, dest: _Destination, token: str, log: Log) -> None:
    """Where folders cannot be exchanged: rename the old one aside, the new one in. Should the run die
    in between, the next one finds the old one aside beside this run's staging folder and puts it back."""
    old = dest.sibling('old', token)
    os.rename(dest.path, old)
    _pause_for_tests('moved-aside')
    try:
        os.rename(staging, dest.path)
    except BaseException:
        os.rename(old, dest.path)
        raise
    _remove_previous(old, dest, log)


def _commit_file(written: Path, dest: _Destination, force: bool) -> None:
    """Move the file ``written`` to ``dest``: replacing what is there only with ``force``."""
    if not written.is_file():
        raise DestinationError(f'nothing was written for {dest.shown}: it is left as it was')
    _check_destination(dest, force, folder=False, while_writing=True)
    if force:
        os.replace(written, dest.path)
    else:
        _rename_no_replace(written, dest, folder=False)


def _rename_no_replace(source: Path, dest: _Destination, folder: bool) -> None:
    """Rename ``source`` to ``dest`` unless something is there now. A folder may take the place of an
    empty folder: ``rename`` never puts one over a folder holding anything, nor over a file."""
    try:
        if folder:
            os.rename(source, dest.path)
        else:
            try:
                _renameat2(source, dest.path, _RENAME_NOREPLACE)
            except _Unsupported:
                if os.path.lexists(dest.path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest.path)) from None
                os.rename(source, dest.path)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            _check_destination(dest, False, folder, while_writing=True)
        raise


def _remove_previous(old: Path, dest: _Destination, log: Log) -> None:
    """Delete the replaced content; failing that the run still succeeded: say what is left where."""
    _remove(old, log=log, what=f'{dest.shown} is the new one, but the previous one could not be deleted')


def _remove(path: Path, log: Optional[Log] = None, what: str = 'could not remove a leftover',
            missing_ok: bool = False) -> bool:
    """Delete a file or folder tree; True if done. With ``log``, a failure is logged instead of raised."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as e:
        if log is None:
            raise
        log(f'warning: {what} ({e.strerror or e}): it is left in {path}; delete it yourself')
        return False
    return True


class _Unsupported(Exception):
    """renameat2, or the flag asked of it, is not available for these paths."""


def _load_renameat2() -> Optional[Callable[..., int]]:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc/musl on Linux
        return None


_RENAMEAT2 = _load_renameat2() if sys.platform.startswith('linux') else None
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> None:
    if _RENAMEAT2 is None:
        raise _Unsupported()
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            raise _Unsupported()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


_held: Optional[List[int]] = None  # the signals received while _signals_held is active


@contextmanager
def _signals_held() -> Iterator[List[int]]:
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends, so that the
    destination never changes half-way. Only the main thread can do this; elsewhere it does nothing.
    A signal the process ignores (SIGINT under ``nohup`` or in a background job) stays ignored."""
    global _held
    received: List[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            # None: installed outside Python, cannot be restored
            if handler is not None and handler is not signal.SIG_IGN:
                previous[signum] = handler
                signal.signal(signum, lambda number, frame: received.append(number))
    _held = received
    try:
        yield received
    finally:
        _held = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def _pause_for_tests(step: str) -> None:
    """With ``$TIMM_EPSA_TEST_PAUSE`` set to ``step``, announce it on stderr and wait for a signal, so
    that a test can interrupt or kill the run exactly here. Test-only. The wait ends by itself after
    as long as a test waits for a child to pause (a test may pause two children at once)."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    print(f'timm-epsa: paused at {step} (pid {os.getpid()})', file=sys.stderr, flush=True)
    deadline = time.monotonic() + 300
    while not _held and time.monotonic() < deadline:
        time.sleep(0.01)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
