"""Real signals sent to a child `timm-epsa convert` at named steps (``$TIMM_EPSA_TEST_PAUSE``, see
timm_epsa/staging.py): OUT_DIR is the complete old or the complete new folder, the child ends with
one line, and what a killed child leaves is dealt with by the next run."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from cli_run import assert_one_line_error, run_cli
from timm_epsa import staging
from timm_epsa.staging import PAUSE_ENV, staged_folder

pytest_plugins = ['hub_stub']  # fixtures: converted (a train.py checkpoint of epsanet50), child_env
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('single_thread')]

REPO = Path(__file__).resolve().parents[1]
FOLDER_FILES = ['README.md', 'config.json', 'model.safetensors']
WITHOUT_EXCHANGE = """
import sys
import timm_epsa.staging
timm_epsa.staging._RENAMEAT2 = None  # as where the OS cannot exchange two folders
from timm_epsa.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Child:
    """``timm-epsa ARGS`` (or a script taking them) from this checkout, stopped at ``pause_at``."""

    def __init__(self, env: Dict[str, str], args: List[str], pause_at: str, script: Optional[str] = None):
        env = {**env, PAUSE_ENV: pause_at, 'PYTHONPATH': os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')])}
        command = ['-c', script] if script else ['-m', 'timm_epsa.cli']
        self.process = subprocess.Popen(
            [sys.executable, *command, *map(str, args)], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # a child of a background job or nohup would inherit SIGINT ignored: give it Ctrl-C as a user has it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.stderr: List[str] = []
        self.paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line.rstrip('\n'))
            if line.startswith('timm-epsa: paused at '):
                self.paused.set()

    def wait_paused(self) -> None:
        assert self.paused.wait(300) and self.process.poll() is None, '\n'.join(self.stderr)

    def finish(self, signum: int) -> int:
        self.process.send_signal(signum)
        status = self.process.wait(120)
        self._reader.join(10)
        return status

    @property
    def err(self) -> str:
        return '\n'.join(self.stderr) + '\n'


def old_folder(root: Path) -> Path:
    out = root / 'out'
    out.mkdir(parents=True)
    (out / 'old.txt').write_text('old')
    return out


def test_sigterm_midway_leaves_the_old_folder_and_a_second_writer_is_refused_at_once(
        converted, tmp_path, child_env, capsys):
    checkpoint, _, _ = converted
    out = old_folder(tmp_path)
    child = Child(child_env, ['convert', checkpoint, out, '--model', 'epsanet50', '--force'], pause_at='staging')
    child.wait_paused()

    status, _, err = run_cli(capsys, 'convert', checkpoint, out, '--model', 'epsanet50', '--force')
    assert status == 1 and 'reading' not in err  # refused before any work
    assert_one_line_error(err, 'convert', f'{out} is being written by another timm-epsa (pid {child.process.pid})')

    assert child.finish(signal.SIGTERM) == 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended
    assert child.stderr[-1] == 'timm-epsa convert: terminated' and 'Traceback' not in child.err
    assert [p.name for p in tmp_path.iterdir()] == ['out'] and [p.name for p in out.iterdir()] == ['old.txt']


def test_an_interrupt_during_the_swap_waits_for_it_and_a_kill_between_renames_is_undone(
        converted, tmp_path, child_env):
    """SIGINT while the new folder takes OUT_DIR's place (renameat2): held back until it has, so OUT_DIR
    is the new folder and the child says so. SIGKILL between the two renames of the fallback (no
    renameat2): OUT_DIR is missing, and the next run puts the old folder back."""
    checkpoint, _, _ = converted
    swapped, moved_aside = old_folder(tmp_path / 'swap'), old_folder(tmp_path / 'aside')
    convert = ['convert', checkpoint, '--model', 'epsanet50', '--force']
    children = [
        Child(child_env, [*convert, swapped], pause_at='commit'),
        Child(child_env, [*convert, moved_aside], pause_at='moved-aside', script=WITHOUT_EXCHANGE),
    ]
    for child in children:
        child.wait_paused()
    interrupted, killed = children

    if staging._RENAMEAT2 is not None:
        assert interrupted.finish(signal.SIGINT) == 130
        assert interrupted.stderr[-2:] == [
            f'{swapped} was written completely before the interrupt took effect', 'timm-epsa convert: interrupted']
        assert sorted(p.name for p in swapped.iterdir()) == FOLDER_FILES
        assert [p.name for p in swapped.parent.iterdir()] == ['out']
    else:
        interrupted.finish(signal.SIGKILL)

    assert killed.finish(signal.SIGKILL) == -signal.SIGKILL
    assert not moved_aside.exists()
    left = sorted(p.name for p in moved_aside.parent.iterdir())
    assert sorted(name.rsplit('.', 1)[-1] for name in left) == ['lock', 'old', 'partial'], left
    log = []
    with staged_folder(moved_aside, force=True, log=log.append) as new:
        assert [p.name for p in moved_aside.iterdir()] == ['old.txt']
        (new / 'next.txt').write_text('next run')
    assert log[0].startswith(f'{moved_aside} was missing: put back the previous {moved_aside} from .out.')
    assert log[1].startswith('removed .out.')
    assert log[1].endswith(': the unfinished output (or the replaced content) of a timm-epsa run that was killed')
    assert [p.name for p in moved_aside.parent.iterdir()] == ['out']
