"""The CPU an export is tuned and measured on: its model and the instruction sets the runtimes' fast
kernels depend on, so that speed figures and tuned forms are never carried to another kind of CPU."""
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Tuple

__all__ = ['SPEED_FLAGS', 'cpu_flags', 'cpu_model', 'describe_cpu', 'usable_cores']

# /proc/cpuinfo flags that change which convolution kernels oneDNN and MLAS run, and how fast:
# vector width, bf16 and int8 dot products (VNNI), and the AMX tile units.
SPEED_FLAGS = (
    'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'avx512_fp16',
    'amx_tile', 'amx_bf16', 'amx_int8',
)


@lru_cache(maxsize=None)
def _cpuinfo() -> Tuple[str, Tuple[str, ...]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; the platform's processor string
    and no flags where there is no such file."""
    path = Path('/proc/cpuinfo')
    fields = {}
    if path.exists():
        first_processor = path.read_text(errors='replace').split('\n\n')[0]
        for line in first_processor.splitlines():
            key, _, value = (part.strip() for part in line.partition(':'))
            fields.setdefault(key, value)
    model = fields.get('model name') or platform.processor() or platform.machine()
    if 'cpu family' in fields and 'model' in fields:  # virtual machines often name every Xeon alike
        model = f"{model} (family {fields['cpu family']} model {fields['model']})"
    return model, tuple((fields.get('flags') or fields.get('Features') or '').split())


def cpu_model() -> str:
    """The processor's name with its family and model numbers, e.g. ``Intel(R) Xeon(R) Processor
    (family 6 model 207)``."""
    return _cpuinfo()[0]


def cpu_flags() -> Tuple[str, ...]:
    """The :data:`SPEED_FLAGS` this CPU has, in that order."""
    flags = set(_cpuinfo()[1])
    return tuple(flag for flag in SPEED_FLAGS if flag in flags)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, e.g. under ``taskset``), which the runtimes' default
    thread pools follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_cpu() -> str:
    """One line for tables and logs: model, AMX / AVX512-BF16 / VNNI flags, usable cores."""
    flags = cpu_flags()
    return f'{cpu_model()} [{" ".join(flags) or "no AVX2"}], {usable_cores()} usable cores'
