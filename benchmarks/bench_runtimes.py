"""Throughput of EPSANet against ResNet and the attention ResNets in each runtime users deploy to.

    python benchmarks/bench_runtimes.py                     # epsanet50 and its peers, every runtime
    python benchmarks/bench_runtimes.py --model epsanet50_large --runtimes onnxruntime,openvino --rounds 5
    python benchmarks/bench_runtimes.py --profile --peers ''   # where the time goes, op by op

Runtimes: eager PyTorch and ``torch.compile`` (inductor), each model in its faster memory format;
ONNX Runtime and OpenVINO on the CPU in fp32. For the last two every model is exported by
``timm_epsa.deploy.export_model`` (EPSANet in the graph form chosen for the runtime, the other models
as they are; each export checked against eager) with a dynamic batch. The models of one runtime and
batch size are timed interleaved, one call each round after round (ONNX Runtime: after two
untimed calls, see ``SETTLE_CALLS``), after a warm-up, and medians are reported, so a drift in the
machine's speed hits all of them alike. The ratio is to the ResNet of the same depth and width in
the same runtime and batch.

``--profile`` instead runs ONNX Runtime's profiler and OpenVINO's performance counters on the
exported models and prints milliseconds per image by kind of operation: the stem, the 1x1
convolutions (identical in EPSANet and ResNet, except EPSANet's depthwise sums in OpenVINO), the
other convolutions (PSA's branches, ResNet's 3x3) and everything else (PSA's pooling, SE, softmax,
attention, layout changes).
"""
import argparse
import collections
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import timm
import timm_epsa  # noqa: F401  registers the models
from timm_epsa.deploy import export_model, load_runner

from bench_epsanet import time_interleaved  # this folder is the script's: sys.path[0]

BASELINES = {  # timm's ResNet of the same depth and bottleneck width
    'epsanet50': 'resnet50',
    'epsanet101': 'resnet101',
    'epsanet50_large': 'wide_resnet50_2',
    'epsanet101_large': 'wide_resnet101_2',
}
PEERS = {  # the attention ResNets users weigh EPSANet-50 against
    'epsanet50': ('seresnet50', 'skresnet50', 'res2net50_26w_4s', 'resnest50d', 'resnext50_32x4d'),
}
RUNTIMES = ('eager', 'compile', 'onnxruntime', 'openvino')
# Untimed calls before each timed one. ONNX Runtime's worker threads spin for tens of milliseconds
# after a call, so the first calls of the next model's session share the cores with them (resnet50
# at batch 1, 2 threads: 38 and 32 ms, then 19 ms, as alone); a deployed model runs alone.
SETTLE_CALLS = {'onnxruntime': 2}

Step = Callable[[], object]
Variants = Dict[str, Tuple[nn.Module, torch.memory_format]]  # by 'name@format'


def in_both_memory_formats(models: Dict[str, nn.Module]) -> Variants:
    """Each model as it is (NCHW) and as a channels-last copy: PyTorch runs a
    model in its faster format (:func:`report` keeps it), and which that is depends on the model, the
    batch size and whether it is compiled (resnet50 at batch 1 on 2 threads: eager faster as NCHW,
    compiled 1.7x faster as channels-last)."""
    variants: Variants = {}
    for name, model in models.items():
        variants[f'{name}@nchw'] = model, torch.contiguous_format
        channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        variants[f'{name}@channels_last'] = channels_last, torch.channels_last
    return variants


def eager_steps(variants: Variants, x: torch.Tensor) -> Dict[str, Step]:
    return {key: _infer(model, x.contiguous(memory_format=fmt)) for key, (model, fmt) in variants.items()}


def compile_steps(variants: Variants, x: torch.Tensor) -> Dict[str, Step]:
    """Each variant compiled for this input shape. The timm ResNets share one ``forward``, and dynamo
    keeps at most ``recompile_limit`` (8) graphs per function before running it eagerly: the cache is
    emptied for each batch size and the limit raised well above the number of variants."""
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(variants))
    return {key: _infer(torch.compile(model, dynamic=False), x.contiguous(memory_format=fmt))
            for key, (model, fmt) in variants.items()}


def _infer(model: nn.Module, x: torch.Tensor) -> Step:
    def step():
        with torch.inference_mode():
            return model(x)
    return step


def exported_steps(runtime: str, models: Dict[str, nn.Module], x: torch.Tensor, workdir: Path, threads: int,
                   cache: Dict) -> Dict[str, Step]:
    steps = {}
    for name, model in models.items():
        if (runtime, name) not in cache:
            out = workdir / (f'{name}.{runtime}.' + ('onnx' if runtime == 'onnxruntime' else 'xml'))
            start = time.perf_counter()
            report = export_model(model, out, runtime, img_size=x.shape[-1])
            print(f'  exported {name} for {runtime} in {time.perf_counter() - start:.0f} s, '
                  f'max error {report.max_error:.1e}', file=sys.stderr, flush=True)
            cache[runtime, name] = load_runner(runtime, out, threads=threads)
        run, array = cache[runtime, name], x.numpy()
        steps[name] = (lambda run, array: lambda: run(array))(run, array)
    return steps


def conv_kind(weight_shape: Sequence[int]) -> str:
    """The kind of a convolution from its weight shape: (O, I, kH, kW), or OpenVINO's (G, O/G, I/G, kH, kW)."""
    if weight_shape[-1] == weight_shape[-2] == 1:
        return '1x1 convs'
    if weight_shape[-3] == 3 and weight_shape[-1] == 7:
        return 'stem 7x7 conv'
    return 'kxk convs (PSA branches / 3x3)'


def profile_onnxruntime(path: Path, x: np.ndarray, threads: int, runs: int) -> Dict[str, float]:
    """Milliseconds per image by kind of operation, from ONNX Runtime's profiler."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(''))
    session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    session.run(None, {name: x})  # warm-up, left out below
    for _ in range(runs):
        session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    first_run = [e['ts'] for e in events if e.get('name') == 'model_run'][1]
    kinds: Dict[str, float] = collections.Counter()
    for event in events:
        if event.get('cat') != 'Node' or not event['name'].endswith('_kernel_time') or event['ts'] < first_run:
            continue
        args = event['args']
        kind = 'other ops'
        if args.get('op_name') == 'Conv':
            kind = conv_kind(next(iter(args['input_type_shape'][1].values())))
        kinds[kind] += event['dur'] / 1e3 / runs / x.shape[0]
    return kinds


def profile_openvino(path: Path, x: np.ndarray, threads: int, runs: int) -> Dict[str, float]:
    """Milliseconds per image by kind of operation, from OpenVINO's performance counters."""
    import openvino
    config = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_NUM_THREADS': threads,
              'NUM_STREAMS': 1, 'PERF_COUNT': True}
    compiled = openvino.Core().compile_model(str(path), 'CPU', config)
    weights = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if 'layerType' in info and info['layerType'].astype(str) in ('Convolution', 'GroupConvolution'):
            weights[op.get_friendly_name()] = [int(d) for d in str(op.get_input_partial_shape(1))[1:-1].split(',')]
    request = compiled.create_infer_request()
    request.infer([x])
    kinds: Dict[str, float] = collections.Counter()
    for _ in range(runs):
        request.infer([x])
        for node in request.profiling_info:
            kind = conv_kind(weights[node.node_name]) if node.node_name in weights else 'other ops'
            kinds[kind] += node.real_time.total_seconds() * 1e3 / runs / x.shape[0]
    return kinds


def print_profiles(runtime: str, batch: int, profiles: Dict[str, Dict[str, float]]) -> None:
    kinds = ['stem 7x7 conv', '1x1 convs', 'kxk convs (PSA branches / 3x3)', 'other ops']
    print(f'\n{runtime}, batch {batch}, ms per image: | ' + ' | '.join(kinds) + ' | total |')
    for name, kind_ms in profiles.items():
        total = sum(kind_ms.values())
        print(f'| {name} | ' + ' | '.join(f'{kind_ms.get(k, 0.0):.1f}' for k in kinds) + f' | {total:.1f} |')


def report(runtime: str, batch: int, seconds: Dict[str, float], baseline: str) -> Dict[str, float]:
    """Images per second per model (the faster memory format on PyTorch), printed with the ratio to ``baseline``."""
    rates: Dict[str, float] = {}
    for key, sec in seconds.items():
        name = key.split('@')[0]
        rates[name] = max(rates.get(name, 0.0), batch / sec)
    for name, rate in rates.items():
        print(f'| {runtime} | {batch} | {name} | {rate:.2f} | {rate / rates[baseline]:.2f}x |', flush=True)
    return rates


def machine() -> str:
    cpu = next((line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
                if line.startswith('model name')), platform.processor()) if Path('/proc/cpuinfo').exists() else platform.processor()
    versions = [f'torch {torch.__version__}', f'timm {timm.__version__}']
    for package in ('onnxruntime', 'openvino'):
        try:
            versions.append(f'{package} {__import__(package).__version__}')
        except ImportError:
            pass
    return f'{cpu}, {torch.get_num_threads()} threads; ' + ', '.join(versions)


def profile(args: argparse.Namespace, models: Dict[str, nn.Module], runtimes: Sequence[str], workdir: Path) -> None:
    profilers = {'onnxruntime': profile_onnxruntime, 'openvino': profile_openvino}
    for runtime in runtimes:
        paths = {}
        for name, model in models.items():
            paths[name] = workdir / (f'{name}.{runtime}.' + ('onnx' if runtime == 'onnxruntime' else 'xml'))
            export_model(model, paths[name], runtime, img_size=args.img_size)
        for batch in (int(b) for b in args.batch_sizes.split(',')):
            x = np.random.default_rng(0).standard_normal((batch, 3, args.img_size, args.img_size), dtype=np.float32)
            print_profiles(runtime, batch, {
                name: profilers[runtime](path, x, args.threads, args.rounds) for name, path in paths.items()})


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='epsanet50', choices=sorted(BASELINES))
    parser.add_argument('--peers', default=None,
                        help='comma-separated timm models to time besides the baseline (default: the attention '
                             'ResNets for epsanet50, none for the other variants; "" for none)')
    parser.add_argument('--runtimes', default=','.join(RUNTIMES), help=f'comma-separated, from {", ".join(RUNTIMES)}')
    parser.add_argument('--batch-sizes', default='1,8')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--profile', action='store_true',
                        help='profile the ONNX Runtime and OpenVINO exports op by op instead of timing them')
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(',') if r]
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        parser.error(f'unknown runtimes {", ".join(sorted(unknown))}; choose from {", ".join(RUNTIMES)}')
    peers = PEERS.get(args.model, ()) if args.peers is None else tuple(p for p in args.peers.split(',') if p)
    baseline = BASELINES[args.model]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: timm.create_model(name).eval() for name in (args.model, baseline, *peers)}
    print(f'{machine()}; fp32, {args.img_size} px, random weights, ' +
          (f'{args.rounds} profiled runs' if args.profile else f'medians of {args.rounds} interleaved rounds'))
    cache: Dict = {}
    with tempfile.TemporaryDirectory(prefix='bench-runtimes-') as workdir:
        if args.profile:
            profile(args, models, [r for r in runtimes if r in ('onnxruntime', 'openvino')], Path(workdir))
            return
        print('| runtime | batch | model | images/s | vs ' + baseline + ' |\n|---|---|---|---|---|')
        variants = in_both_memory_formats(models) if {'eager', 'compile'} & set(runtimes) else {}
        for runtime in runtimes:
            for batch in (int(b) for b in args.batch_sizes.split(',')):
                x = torch.randn(batch, 3, args.img_size, args.img_size)
                if runtime == 'eager':
                    steps = eager_steps(variants, x)
                elif runtime == 'compile':
                    steps = compile_steps(variants, x)
                else:
                    steps = exported_steps(runtime, models, x, Path(workdir), args.threads, cache)
                settle = SETTLE_CALLS.get(runtime, 0)
                seconds = time_interleaved(steps, torch.device('cpu'), args.rounds, args.warmup, settle)
                report(runtime, batch, seconds, baseline)


if __name__ == '__main__':
    main()
