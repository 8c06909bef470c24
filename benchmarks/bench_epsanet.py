"""Throughput of EPSANet against the naive reference network and timm's ResNet, in one process.

    python benchmarks/bench_epsanet.py                 # epsanet50, CPU, the figures in README
    python benchmarks/bench_epsanet.py --model epsanet101_large --device cuda --dtype bfloat16

The naive reference is the literal network written from the paper's definition in
tests/naive_epsanet.py (one conv call per branch, SE per branch, loop of concatenations), holding
the same weights as our model; its output is compared with ours before timing. The models are
timed interleaved (one call each, round after round) after a warm-up, and medians are reported,
so drift in the machine's speed hits all of them alike. Each model runs in both memory formats
and is ranked by its faster one. Peak memory of a training step is each model's peak RSS above the
process holding the model (CPU, Linux) or torch's peak allocation (CUDA), in a fresh subprocess
per model.
"""
import argparse
import copy
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch import nn

import timm
import timm_epsa  # noqa: F401  registers the models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from naive_epsanet import NaiveEPSANet  # noqa: E402

NAIVE_ARGS = {
    'epsanet50': dict(layers=(3, 4, 6, 3)),
    'epsanet101': dict(layers=(3, 4, 23, 3)),
    'epsanet50_large': dict(layers=(3, 4, 6, 3), width_mult=2, psa_kwargs=dict(groups=(32, 32, 32, 32))),
    'epsanet101_large': dict(layers=(3, 4, 23, 3), width_mult=2, psa_kwargs=dict(groups=(32, 32, 32, 32))),
}
FORMATS = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}


BASELINES = {  # timm's ResNet of the same depth and bottleneck width: the network each variant modifies
    'epsanet50': 'resnet50',
    'epsanet101': 'resnet101',
    'epsanet50_large': 'wide_resnet50_2',
    'epsanet101_large': 'wide_resnet101_2',
}


def build_models(model_name: str) -> Dict[str, nn.Module]:
    """Our model, the naive reference holding the same weights, and timm's ResNet of the same depth."""
    torch.manual_seed(0)
    ours = timm.create_model(model_name)
    naive = NaiveEPSANet(**NAIVE_ARGS[model_name])
    naive.load_state_dict(ours.state_dict())
    return {'ours': ours, 'naive': naive, BASELINES[model_name]: timm.create_model(BASELINES[model_name])}


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def make_step(model: nn.Module, x: torch.Tensor, train: bool, dtype: torch.dtype) -> Callable[[], None]:
    autocast = dtype != torch.float32

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            model(x)

    def train_step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return train_step if train else infer


def time_interleaved(steps: Dict[str, Callable[[], None]], device: torch.device, rounds: int,
                     warmup: int, settle: int = 0) -> Dict[str, float]:
    """Median seconds per call for each step, calling them in turn round after round; each timed call
    after ``settle`` untimed ones of the same step, for runtimes whose previous step's threads keep
    the cores busy for a while."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            for _ in range(settle):
                step()
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def check_equal(models: Dict[str, nn.Module], device: torch.device) -> float:
    x = torch.randn(2, 3, 128, 128, device=device)
    with torch.inference_mode():
        ours, naive = models['ours'](x), models['naive'](x)
    return ((ours - naive).abs().max() / naive.abs().max()).item()


def throughput(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, train: bool, batch: int,
               size: int) -> Dict[str, Dict[str, float]]:
    """Images per second per model and memory format."""
    models = {kind: model.to(device).train(train) for kind, model in build_models(args.model).items()}
    if not train:
        print(f'  ours vs naive, max relative difference: {check_equal(models, device):.2e}')
    x = torch.randn(batch, 3, size, size, device=device)
    steps = {}
    for kind, model in models.items():
        for fmt_name, fmt in FORMATS.items():
            # a copy per format: converting one model in place would leave only the last format
            variant = copy.deepcopy(model).to(memory_format=fmt)
            steps[(kind, fmt_name)] = make_step(variant, x.contiguous(memory_format=fmt), train, dtype)
    seconds = time_interleaved(steps, device, args.rounds, args.warmup)
    result: Dict[str, Dict[str, float]] = {}
    for (kind, fmt_name), sec in seconds.items():
        result.setdefault(kind, {})[fmt_name] = batch / sec
    return result


def peak_memory_mb(kind: str, args: argparse.Namespace) -> float:
    """Peak memory of one training step, in a fresh process so that models don't share a peak."""
    cmd = [sys.executable, __file__, '--model', args.model, '--device', args.device, '--dtype', args.dtype,
           '--train-batch', str(args.train_batch), '--train-size', str(args.train_size), '--_peak-memory-of', kind]
    # glibc then serves every large tensor by mmap and unmaps it on free, so RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072')
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_mb']


def _proc_status_mb(field: str) -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'{field} not in /proc/self/status: peak CPU memory is measured on Linux only')


def measure_peak_memory(kind: str, args: argparse.Namespace) -> None:
    """Print the peak memory of one training step above the memory held before it."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_models(args.model)[kind].to(device).train()
    x = torch.randn(args.train_batch, 3, args.train_size, args.train_size, device=device)
    step = make_step(model, x, True, dtype)
    step()  # first step allocates lazily initialised state; measure the second
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        Path('/proc/self/clear_refs').write_text('5')  # resets the peak RSS (VmHWM) to the current RSS
        base = _proc_status_mb('VmRSS')
        step()
        peak = _proc_status_mb('VmHWM')
    print(json.dumps({'peak_mb': peak - base}))


def report(title: str, result: Dict[str, Dict[str, float]]) -> None:
    best = {kind: max(fmts.values()) for kind, fmts in result.items()}
    print(f'\n{title}')
    print(f'  {"model":<16} {"contiguous":>12} {"channels_last":>14} {"best img/s":>11}')
    for kind, fmts in result.items():
        print(f'  {kind:<16} {fmts["contiguous"]:>12.1f} {fmts["channels_last"]:>14.1f} {best[kind]:>11.1f}')
    resnet = next(kind for kind in best if kind not in ('ours', 'naive'))
    print(f'  ours / {resnet} = {best["ours"] / best[resnet]:.2f}x   '
          f'ours / naive = {best["ours"] / best["naive"]:.2f}x')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='epsanet50', choices=sorted(NAIVE_ARGS),
                        help='the baseline is timm\'s ResNet of the same depth and width: ' +
                        ', '.join(f'{k} -> {v}' for k, v in BASELINES.items()))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--batches', default='1,8', help='inference batch sizes, comma separated')
    parser.add_argument('--size', type=int, default=224, help='inference image size')
    parser.add_argument('--train-batch', type=int, default=8)
    parser.add_argument('--train-size', type=int, default=160)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    parser.add_argument('--_peak-memory-of', dest='peak_memory_of', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_of:
        measure_peak_memory(args.peak_memory_of, args)
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f'{args.model} on {device} ({torch.get_num_threads()} threads), {args.dtype}, torch {torch.__version__}, '
          f'timm {timm.__version__}; medians of {args.rounds} interleaved rounds')
    for batch in (int(b) for b in args.batches.split(',')):
        result = throughput(args, device, dtype, train=False, batch=batch, size=args.size)
        report(f'inference, batch {batch}, {args.size}px', result)
    result = throughput(args, device, dtype, train=True, batch=args.train_batch, size=args.train_size)
    report(f'training step (forward + backward), batch {args.train_batch}, {args.train_size}px', result)
    peaks = {kind: peak_memory_mb(kind, args) for kind in ('ours', 'naive', BASELINES[args.model])}
    print('  peak memory of a training step (MB above the model at rest): ' +
          ', '.join(f'{k} {v:.0f}' for k, v in peaks.items()) +
          f'; ours / naive = {peaks["ours"] / peaks["naive"]:.2f}x')


if __name__ == '__main__':
    main()
