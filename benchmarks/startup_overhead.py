"""Interpreter start-up cost of the timm plugin hook (``timm_epsa_autoload.pth``).

Times ``python -c pass`` with the hook enabled and with ``TIMM_EPSA_AUTOLOAD=0``, alternating the
two so that machine load drifts affect both alike, and prints medians, the difference and the
ratio. Run it with the interpreter of an environment where timm-epsa is installed::

    python benchmarks/startup_overhead.py --runs 300
    python benchmarks/startup_overhead.py --python /path/to/venv/bin/python

Times include process creation; that cost is the same on both sides, so the difference is the
hook's (the .pth line, importing ``_timm_epsa_autoload`` and adding its finder).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

CHECK = "import sys; print('_timm_epsa_autoload' in sys.modules, any(m in sys.modules for m in ('torch', 'timm', 'timm_epsa')))"


def _env(enabled: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop('TIMM_EPSA_AUTOLOAD', None)
    if not enabled:
        env['TIMM_EPSA_AUTOLOAD'] = '0'
    return env


def _check(python: str) -> None:
    """Refuse to time anything unless the hook is installed, is switched off by the variable,
    and imports nothing heavy."""
    for enabled in (True, False):
        out = subprocess.run([python, '-c', CHECK], env=_env(enabled), capture_output=True, text=True, check=True)
        hooked, heavy = (word == 'True' for word in out.stdout.split())
        if hooked != enabled or heavy:
            sys.exit(f'{python}: hook {"loaded" if hooked else "not loaded"}, heavy modules imported: {heavy} '
                     f'with the hook {"enabled" if enabled else "disabled"}; is timm-epsa installed there?')


def _time_once(python: str, env: Dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([python, '-c', 'pass'], env=env, check=True)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--python', default=sys.executable, help='interpreter to time (default: this one)')
    parser.add_argument('--runs', type=int, default=200, help='runs per side (default: 200)')
    args = parser.parse_args()

    _check(args.python)
    times: Dict[bool, List[float]] = {True: [], False: []}
    envs = {enabled: _env(enabled) for enabled in times}
    for enabled in (True, False):  # warm the OS caches, not timed
        _time_once(args.python, envs[enabled])
    for i in range(args.runs):
        for enabled in ((True, False) if i % 2 else (False, True)):
            times[enabled].append(_time_once(args.python, envs[enabled]))

    on, off = (statistics.median(times[enabled]) for enabled in (True, False))
    print(f'interpreter: {args.python} ({args.runs} runs per side, `-c pass`)')
    for label, enabled in (('hook enabled ', True), ('hook disabled', False)):
        t = times[enabled]
        print(f'{label}: median {statistics.median(t):.2f} ms, mean {statistics.fmean(t):.2f} ms, '
              f'min {min(t):.2f} ms')
    print(f'overhead: {on - off:+.2f} ms (median), ratio {on / off:.3f}')


if __name__ == '__main__':
    main()
