"""Outputs appear whole or not at all and nothing a user had is lost (timm_epsa/staging.py):
in-process on small folders; tests/test_interrupts.py sends real signals to `timm-epsa` children."""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from timm_epsa import staging
from timm_epsa.staging import DestinationError, staged_file, staged_folder


class Log(list):
    def __call__(self, message):
        self.append(message)


@pytest.fixture
def log():
    return Log()


@pytest.fixture(params=['exchange', 'rename-aside'])
def swap(request, monkeypatch):
    """Both ways a folder takes its destination's place: renameat2(RENAME_EXCHANGE), and the
    fallback where the OS offers no such call."""
    if request.param == 'exchange' and staging._RENAMEAT2 is None:
        pytest.skip('renameat2 is not available here')
    if request.param == 'rename-aside':
        monkeypatch.setattr(staging, '_RENAMEAT2', None)
    return request.param


def write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def contents(folder: Path) -> dict:
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file() and not p.name.startswith('.')}


def test_new_folder_appears_whole_and_nothing_else_is_left(tmp_path, log):
    with staged_folder(tmp_path / 'out', log=log) as staging_dir:
        assert staging_dir.parent == tmp_path and staging_dir.name.startswith('.out.')
        assert (tmp_path / '.out.timm-epsa.lock').read_text() == f'{os.getpid()}\n'
        write(staging_dir, a='new')
        assert not (tmp_path / 'out').exists()
    assert [p.name for p in tmp_path.iterdir()] == ['out'] and contents(tmp_path / 'out') == {'a': 'new'}
    assert log == []


def test_force_replaces_the_old_folder_only_with_the_complete_new_one(tmp_path, log, swap):
    out = write(tmp_path / 'out', old='old')
    with pytest.raises(DestinationError, match=f'{out} is not empty; pass --force'):
        with staged_folder(out, log=log):
            pytest.fail('a non-empty folder must be refused before any work')
    with pytest.raises(RuntimeError, match='writer failed'):
        with staged_folder(out, force=True, log=log) as staging_dir:
            write(staging_dir, a='half')
            raise RuntimeError('writer failed')
    assert contents(out) == {'old': 'old'}
    with staged_folder(out, force=True, log=log) as staging_dir:
        write(staging_dir, a='new')
    assert [p.name for p in tmp_path.iterdir()] == ['out'] and contents(out) == {'a': 'new'}
    assert log == []


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path, log):
    (tmp_path / 'here').symlink_to('.')  # another spelling of the same folder: through a linked parent
    with staged_folder(tmp_path / 'out', log=log) as staging_dir:
        for force, out in ((False, 'out'), (True, 'here/out')):
            busy = rf'{out} is being written by another timm-epsa \(pid {os.getpid()}\)'
            with pytest.raises(DestinationError, match=busy):
                with staged_folder(tmp_path / out, force=force, log=log):
                    pytest.fail('two writers at once')
        write(staging_dir, a='first')
    assert contents(tmp_path / 'out') == {'a': 'first'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['here', 'out']
    with staged_folder(tmp_path / 'out', force=True, log=log) as staging_dir:  # the lock went with its run
        write(staging_dir, a='second')
    assert contents(tmp_path / 'out') == {'a': 'second'}


@pytest.mark.parametrize('existing', [False, True], ids=['absent', 'empty'])
def test_files_a_user_puts_into_out_meanwhile_survive(tmp_path, log, swap, existing):
    out = tmp_path / 'out'
    if existing:
        out.mkdir()
    with pytest.raises(DestinationError, match='was filled while timm-epsa was writing it: it is left as it is'):
        with staged_folder(out, log=log) as staging_dir:
            write(staging_dir, a='new')
            write(out, mine='user')
    assert contents(out) == {'mine': 'user'} and [p.name for p in tmp_path.iterdir()] == ['out']


def test_a_file_that_appears_just_before_the_swap_stays_and_nothing_is_replaced(tmp_path, log, monkeypatch):
    """The check before the swap can be overtaken: without force the swap itself (a rename, which
    replaces an empty folder only) refuses, and the user's file stays where it was put."""
    out = (tmp_path / 'out')
    out.mkdir()
    rename = os.rename

    def racing(source, target):
        if Path(target) == out and not (out / 'mine').exists():
            write(out, mine='user')
        rename(source, target)
    monkeypatch.setattr(os, 'rename', racing)
    with pytest.raises(DestinationError, match='was filled while'):
        with staged_folder(out, log=log) as staging_dir:
            write(staging_dir, a='new')
    assert contents(out) == {'mine': 'user'} and [p.name for p in tmp_path.iterdir()] == ['out']


def test_a_link_planted_where_the_lock_goes_is_not_written_through(tmp_path, log):
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    (tmp_path / '.out.timm-epsa.lock').symlink_to(victim)
    with pytest.raises(DestinationError, match=r'\.out\.timm-epsa\.lock is a symbolic link'):
        with staged_folder(tmp_path / 'out', log=log):
            pass
    assert victim.read_text() == 'precious' and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('staged', [staged_folder, staged_file])
@pytest.mark.parametrize('force', [False, True])
def test_a_link_at_the_destination_is_refused_and_what_it_points_to_kept(tmp_path, log, staged, force):
    """Neither written through (the checkpoint a link points to became an ONNX file) nor replaced;
    a dangling link is not followed either (folders were created where it pointed)."""
    mine = write(tmp_path / 'mine', notes='mine') if staged is staged_folder else tmp_path / 'model.pth'
    if staged is staged_file:
        mine.write_text('my checkpoint')
    (tmp_path / 'link').symlink_to(mine.name)
    (tmp_path / 'dangling').symlink_to('nowhere/deep/x')
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, target in (('link', f'{mine}'), ('dangling', f"{tmp_path / 'nowhere/deep/x'}, which does not exist")):
        with pytest.raises(DestinationError, match=re.escape(
                f'{tmp_path / out} is a symbolic link to {target}: timm-epsa neither writes through a link nor '
                f'replaces one, --force or not; give ')):
            with staged(tmp_path / out, force=force, log=log):
                pytest.fail('a link must be refused before any work')
    assert sorted(p.name for p in tmp_path.iterdir()) == before and log == []
    assert (contents(mine) == {'notes': 'mine'}) if mine.is_dir() else (mine.read_text() == 'my checkpoint')


def test_no_folder_is_made_where_a_dangling_link_on_the_way_points(tmp_path, log):
    (tmp_path / 'runs').symlink_to('nowhere/deep')
    with pytest.raises(DestinationError, match=re.escape(
            f"{tmp_path / 'runs/out'}: the folder {tmp_path / 'runs'} on the way to it is a symbolic link to "
            f"{tmp_path / 'nowhere/deep'}, which does not exist; timm-epsa creates no folder where a link points")):
        with staged_folder(tmp_path / 'runs' / 'out', log=log):
            pytest.fail('refused before any work')
    assert [p.name for p in tmp_path.iterdir()] == ['runs']


@pytest.mark.parametrize('umask', [0o022, 0o027], ids=['umask-022', 'umask-027'])
def test_what_a_run_writes_follows_the_umask(tmp_path, log, umask):
    """safetensors writes its files 0600: weights in a shared folder that nobody else could read."""
    previous = os.umask(umask)
    try:
        with staged_folder(tmp_path / 'out', log=log) as staging_dir:
            write(staging_dir / 'sub', a='a').chmod(0o700)
            (staging_dir / 'weights').write_bytes(b'w')
            (staging_dir / 'weights').chmod(0o600)
        with staged_file(tmp_path / 'model.onnx', log=log) as path:
            path.write_bytes(b'onnx')
            path.chmod(0o600)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob('*')}
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    assert modes == {'out': folders, 'out/sub': folders, 'out/sub/a': files, 'out/weights': files, 'model.onnx': files}


@pytest.fixture
def undeletable(tmp_path):
    """A folder whose content cannot be deleted: immutable for root (chattr +i), read-only otherwise."""
    def make(folder: Path) -> Path:
        sub = write(folder / 'sub', f='f')
        if os.geteuid() == 0:
            if subprocess.run(['chattr', '+i', str(sub)], capture_output=True).returncode != 0:
                pytest.skip('chattr +i does not work here (root ignores permissions)')
        else:
            sub.chmod(0o500)
        return sub
    yield make
    if os.geteuid() == 0:  # wherever the folder has moved, so that pytest can delete it
        subprocess.run(['chattr', '-R', '-i', str(tmp_path)], capture_output=True)
    else:
        for sub in tmp_path.rglob('sub'):
            sub.chmod(0o700)


def test_an_old_folder_that_cannot_be_deleted_is_success_and_one_warning(tmp_path, log, swap, undeletable):
    out = tmp_path / 'out'
    undeletable(out)
    with staged_folder(out, force=True, log=log) as staging_dir:
        write(staging_dir, a='new')
    assert contents(out) == {'a': 'new'}
    left, = [p for p in tmp_path.iterdir() if p.name != 'out']
    warning, = log
    assert warning.startswith(f'warning: {out} is the new one, but the previous one could not be deleted (')
    assert warning.endswith(f'it is left in {left}; delete it yourself')

    log.clear()  # the next run tries again, warns again, and works
    with staged_folder(out, force=True, log=log) as staging_dir:
        write(staging_dir, a='newer')
    assert contents(out) == {'a': 'newer'} and len(log) == 1 and f'it is left in {left}' in log[0]


def test_leftovers_of_killed_runs_are_restored_or_removed_and_reported(tmp_path, log, monkeypatch):
    """What tests/test_interrupts.py sees real killed runs leave, made by hand: the next run writing
    the same destination puts a moved-aside folder back, removes the rest, and says so."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / '.out.0123abcd.old', old='old')  # killed between the two renames of the fallback
    write(tmp_path / '.out.4567cdef.partial', half='new')  # killed while writing
    write(tmp_path / '.other.89abcdef.partial', x='another destination, left alone')
    with staged_folder('out', force=True, log=log) as staging_dir:
        assert contents(tmp_path / 'out') == {'old': 'old'}
        write(staging_dir, a='new')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.other.89abcdef.partial', 'out']
    assert log == [
        'out was missing: put back the previous out from .out.0123abcd.old, where a timm-epsa run that was killed '
        'had moved it aside',
        'removed .out.4567cdef.partial beside out: the unfinished output (or the replaced content) of a timm-epsa run '
        'that was killed',
    ]
    log.clear()
    write(tmp_path / '.out.0123abcd.old', old='replaced')  # killed after the new folder took its place
    with pytest.raises(DestinationError, match='not empty'):
        with staged_folder('out', log=log):
            pass
    assert contents(tmp_path / 'out') == {'a': 'new'} and log == [
        'removed .out.0123abcd.old beside out: what out held before a timm-epsa run that was killed replaced it']


def test_a_folder_moved_aside_by_a_killed_run_is_never_deleted(tmp_path, log, monkeypatch):
    """Killed between its two renames, a run leaves the old folder aside and its own new one unfinished;
    if the destination has been made again meanwhile, the next run (without force) keeps both."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / '.out.0123abcd.old', mine='the previous out')
    write(tmp_path / '.out.0123abcd.partial', half='new')
    (tmp_path / 'out').mkdir()  # the user, finding out gone, made it again
    with staged_folder('out', log=log) as staging_dir:
        write(staging_dir, a='new')
    assert contents(tmp_path / 'out') == {'a': 'new'}
    assert contents(tmp_path / '.out.0123abcd.old') == {'mine': 'the previous out'}
    assert log[0].startswith(f"warning: {tmp_path / '.out.0123abcd.old'} holds the previous out, moved aside by a")
    assert not (tmp_path / '.out.0123abcd.partial').exists()


def test_destinations_that_cannot_be_written_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path / 'here'))
    (tmp_path / 'file').write_text('a file')
    for out, message in [
        ('.', 'is the current folder or holds it'),
        (tmp_path, 'is the current folder or holds it'),
        ('/', 'names no file or folder to write'),
        ('x' * 256, 'the name is 256 bytes long, more than the 255'),
        (os.fsdecode(b'out\xff'), r'out\\xff: the path is not valid UTF-8'),
        (tmp_path / 'file', 'is a file, and a folder was to be written there'),
        (tmp_path / 'file' / 'out', r'cannot write in .*/file, where .*/file/out goes \(Not a directory\)'),
    ]:
        with pytest.raises(DestinationError, match=message):
            with staged_folder(out):
                pytest.fail(f'{out} must be refused')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file', 'here'] and not any((tmp_path / 'here').iterdir())


def test_the_longest_name_works_and_its_hidden_siblings_fit(tmp_path, log, swap):
    name = 'é' * 127 + 'x'  # 255 bytes in UTF-8
    with staged_folder(tmp_path / name, log=log) as staging_dir:
        assert len(staging_dir.name.encode()) <= 255
        write(staging_dir, a='1')
    with staged_folder(tmp_path / name, force=True, log=log) as staging_dir:
        write(staging_dir, a='2')
    assert [p.name for p in tmp_path.iterdir()] == [name] and contents(tmp_path / name) == {'a': '2'}


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / 'a' / 'b' / 'out'):
            raise RuntimeError('writer failed')
    assert list(tmp_path.iterdir()) == []


def test_a_file_replaces_whole_and_only_with_force(tmp_path, log):
    onnx = tmp_path / 'model.onnx'
    with staged_file(onnx, log=log) as path:
        assert path.parent != tmp_path and path.name == 'model.onnx'
        path.write_text('v1')
    with pytest.raises(DestinationError, match='model.onnx exists; pass --force'):
        with staged_file(onnx, log=log) as path:
            path.write_text('v2')
    assert onnx.read_text() == 'v1'
    with staged_file(onnx, force=True, log=log) as path:
        path.write_text('v2')
    with pytest.raises(DestinationError, match='nothing was written for'):
        with staged_file(onnx, force=True, log=log):
            pass
    assert contents(tmp_path) == {'model.onnx': 'v2'} and log == []


def test_without_a_log_what_was_done_is_a_warning(tmp_path):
    write(tmp_path / '.out.0123abcd.partial', half='new')
    with pytest.warns(RuntimeWarning, match='removed .out.0123abcd.partial beside'):
        with staged_folder(tmp_path / 'out') as staging_dir:
            write(staging_dir, a='new')


def test_disk_full_is_one_line_and_leaves_the_old_folder(tmp_path, log):
    mount = tmp_path / 'small'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root, or a mount namespace)')
    try:
        out = write(mount / 'out', old='old')
        with pytest.raises(DestinationError, match=rf'^no space left on the device for {out} \(No space left on '
                                                    rf'device\); {out} is unchanged: free some space'):
            with staged_folder(out, force=True, log=log) as staging_dir:
                (staging_dir / 'big').write_bytes(os.urandom(2 << 20))
        assert contents(out) == {'old': 'old'} and [p.name for p in mount.iterdir()] == ['out']
        with pytest.raises(DestinationError, match='is a mount point, which cannot be replaced'):
            with staged_folder(mount, force=True, log=log):
                pass
    finally:
        subprocess.run(['umount', str(mount)], check=True)


def test_a_signal_the_process_ignores_stays_ignored_across_the_swap():
    """Under nohup or in a background job SIGINT is ignored: holding it back and raising it again
    would claim an interrupt that never takes effect."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with staging._signals_held() as received:
            os.kill(os.getpid(), signal.SIGINT)
        assert received == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
