"""Throughput of EPSANet against ResNet and the attention ResNets in each runtime users deploy to.

    python benchmarks/bench_runtimes.py                     # epsanet50 and its peers, every runtime, fp32
    python benchmarks/bench_runtimes.py --precision bf16    # eager/compile under bf16 autocast, OpenVINO bf16
    python benchmarks/bench_runtimes.py --precision int8    # ONNX Runtime and OpenVINO, every model quantized
    python benchmarks/bench_runtimes.py --model epsanet50_large --runtimes onnxruntime,openvino --rounds 5
    python benchmarks/bench_runtimes.py --profile --peers ''   # where the time goes, op by op
    python benchmarks/bench_runtimes.py --forms --precision bf16 --runtimes openvino  # the export against each form

Runtimes: eager PyTorch and ``torch.compile`` (inductor), each model in its faster memory format
(bf16: under ``torch.autocast``); ONNX Runtime and OpenVINO on the CPU. For the last two every model
is exported by ``timm_epsa.deploy.export_model`` for the precision (EPSANet in the graph form tuned
on this machine for the runtime and precision, or the fixed rules with ``--no-tune``; the other
models as they are; int8: every model quantized the same way, calibrated on synthetic images, its
top-1 check waived as random weights have nothing to agree on) with a dynamic batch, and run as
the export was checked (OpenVINO: ``INFERENCE_PRECISION_HINT`` f32 or bf16; int8: the plugin's
default for what is not quantized). The models of one runtime and batch size are timed interleaved,
one call each round after round, each timed call after two untimed ones (``SETTLE_CALLS``), after a
warm-up, and medians are reported, so a drift in the machine's speed hits all of them alike. The
ratio is to the ResNet of the same depth and width in the same runtime, precision and batch. The
table is headed by the CPU's model and the flags its kernels depend on (AMX, AVX512-BF16, VNNI):
figures from CPUs with other flags do not compare.

``--forms`` instead times epsanet50 in the runtime and precision as the export makes it, with the
fixed rules, as the fp32-only export before precisions made it, and with every grouped branch in
one form (as it is, depthwise with reduced or 1x1 sums, block-diagonal with at least 16 or 32
outputs per group, dense), each against resnet50 in the same run.

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
from PIL import Image
from timm_epsa.deploy import export_model, load_runner
from timm_epsa.deploy.cpu_info import describe_cpu
from timm_epsa.deploy.forms import branch_form, fewer_groups
from timm_epsa.deploy.psa_graph import BranchForm
from timm_epsa.deploy.runtimes import default_precision

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
PRECISION_RUNTIMES = {  # the runtimes that run each precision
    'fp32': RUNTIMES, 'bf16': ('eager', 'compile', 'openvino'), 'int8': ('onnxruntime', 'openvino')}
# Untimed calls before each timed one; a deployed model runs alone. ONNX Runtime's worker threads
# spin for tens of milliseconds after a call, so the first calls of the next model's session share
# the cores with them (resnet50 at batch 1, 2 threads: 38 and 32 ms, then 19 ms, as alone). OpenVINO
# at bf16 and int8 on AMX runs so fast that reloading a model's weights into the caches after
# another model ran is a large part of a call (resnet50 bf16 at batch 1, one thread on a busy
# machine: 36 img/s without settling, 65 with).
SETTLE_CALLS = {'onnxruntime': 2, 'openvino': 2}
CALIBRATION_IMAGES = 150  # synthetic, for int8: the least an export takes

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


def eager_steps(variants: Variants, x: torch.Tensor, precision: str) -> Dict[str, Step]:
    return {key: _infer(model, x.contiguous(memory_format=fmt), precision) for key, (model, fmt) in variants.items()}


def compile_steps(variants: Variants, x: torch.Tensor, precision: str) -> Dict[str, Step]:
    """Each variant compiled for this input shape. The timm ResNets share one ``forward``, and dynamo
    keeps at most ``recompile_limit`` (8) graphs per function before running it eagerly: the cache is
    emptied for each batch size and the limit raised well above the number of variants."""
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(variants))
    return {key: _infer(torch.compile(model, dynamic=False), x.contiguous(memory_format=fmt), precision)
            for key, (model, fmt) in variants.items()}


def _infer(model: nn.Module, x: torch.Tensor, precision: str) -> Step:
    def step():
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            return model(x)
    return step


def exported_steps(runtime: str, exports: Dict[str, Tuple[nn.Module, dict]], x: torch.Tensor, workdir: Path,
                   args: argparse.Namespace, cache: Dict) -> Dict[str, Step]:
    """Each model exported by ``export_model(model, ..., **kwargs)`` for ``runtime`` in ``args.precision``
    (once per run), run on ``x``."""
    steps = {}
    for name, (model, kwargs) in exports.items():
        if (runtime, name) not in cache:
            out = workdir / (f'{name}.{runtime}.' + ('onnx' if runtime == 'onnxruntime' else 'xml'))
            if args.precision == 'int8':
                kwargs = dict(kwargs, calibration=synthetic_images(workdir, x.shape[-1]), min_agreement=0.0)
            start = time.perf_counter()
            kwargs = {'tune': args.tune, **kwargs}
            report = export_model(model, out, runtime, img_size=x.shape[-1], precision=args.precision,
                                  log=lambda message: print(f'  {message}', file=sys.stderr), **kwargs)
            print(f'  exported {name} for {runtime} in {args.precision} in {time.perf_counter() - start:.0f} s, '
                  f'max error {report.max_error:.1e}', file=sys.stderr, flush=True)
            cache[runtime, name] = load_runner(runtime, out, threads=args.threads, precision=args.precision)
        run, array = cache[runtime, name], x.numpy()
        steps[name] = (lambda run, array: lambda: run(array))(run, array)
    return steps


def synthetic_images(workdir: Path, size: int) -> Path:
    """A folder of noise images to calibrate int8 on (once per run): random weights need no better."""
    folder = workdir / f'calibration-{size}'
    if not folder.exists():
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(CALIBRATION_IMAGES):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return folder


def uniform_forms(runtime: str, precision: str) -> Dict[str, Callable]:
    """epsanet50's export options for ``--forms``: as the export makes it, the fixed rules, the fp32
    rules (the export before precisions), and every grouped branch in one form."""
    def at_least(outputs: int) -> Callable:
        def form(name, conv):
            per_group = conv.out_channels // conv.groups
            return BranchForm() if per_group >= outputs else BranchForm(groups=fewer_groups(conv.groups, per_group,
                                                                                            outputs))
        return form
    return {
        'exported': {},
        'rules': {'tune': False},
        'fp32 rules': {'forms': lambda name, conv: branch_form(runtime, conv)},
        'grouped': {'forms': lambda name, conv: BranchForm()},
        'depthwise+reduce': {'forms': lambda name, conv: BranchForm(depthwise=conv.groups > 1)},
        'depthwise+1x1': {'forms': lambda name, conv: BranchForm(depthwise=conv.groups > 1, sums_as_conv=True)},
        'block-diagonal 16': {'forms': at_least(16)},
        'block-diagonal 32': {'forms': at_least(32)},
        'dense': {'forms': lambda name, conv: BranchForm(groups=1)},
    }


def conv_kind(weight_shape: Sequence[int]) -> str:
    """The kind of a convolution from its weight shape: (O, I, kH, kW), or OpenVINO's (G, O/G, I/G, kH, kW)."""
    if weight_shape[-1] == weight_shape[-2] == 1:
        return '1x1 convs'
    if weight_shape[-3] == 3 and weight_shape[-1] == 7:
        return 'stem 7x7 conv'
    return 'kxk convs (PSA branches / 3x3)'


def profile_onnxruntime(path: Path, x: np.ndarray, threads: int, runs: int, precision: str) -> Dict[str, float]:
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
        elif args.get('op_name') == 'QLinearConv':  # inputs: x, its scale and zero point, then the weight
            kind = conv_kind(next(iter(args['input_type_shape'][3].values())))
        kinds[kind] += event['dur'] / 1e3 / runs / x.shape[0]
    return kinds


def profile_openvino(path: Path, x: np.ndarray, threads: int, runs: int, precision: str) -> Dict[str, float]:
    """Milliseconds per image by kind of operation, from OpenVINO's performance counters."""
    import openvino
    from timm_epsa.deploy.precision import openvino_config
    config = {**openvino_config(precision), 'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_NUM_THREADS': threads,
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


def report(runtime: str, precision: str, batch: int, seconds: Dict[str, float], baseline: str) -> Dict[str, float]:
    """Images per second per model (the faster memory format on PyTorch), printed with the ratio to ``baseline``."""
    rates: Dict[str, float] = {}
    for key, sec in seconds.items():
        name = key.split('@')[0]
        rates[name] = max(rates.get(name, 0.0), batch / sec)
    for name, rate in rates.items():
        print(f'| {runtime} | {precision} | {batch} | {name} | {rate:.2f} | {rate / rates[baseline]:.2f}x |', flush=True)
    return rates


def machine() -> str:
    versions = [f'torch {torch.__version__}', f'timm {timm.__version__}']
    for package in ('onnxruntime', 'openvino', 'nncf'):
        try:
            versions.append(f'{package} {__import__(package).__version__}')
        except ImportError:
            pass
    try:
        versions.append(f"OpenVINO's default precision here: {default_precision('openvino')}")
    except ImportError:
        pass
    return f'{describe_cpu()}; {torch.get_num_threads()} threads; ' + ', '.join(versions)


def profile(args: argparse.Namespace, models: Dict[str, nn.Module], runtimes: Sequence[str], workdir: Path) -> None:
    profilers = {'onnxruntime': profile_onnxruntime, 'openvino': profile_openvino}
    for runtime in runtimes:
        paths = {}
        for name, model in models.items():
            paths[name] = workdir / (f'{name}.{runtime}.' + ('onnx' if runtime == 'onnxruntime' else 'xml'))
            int8 = {'calibration': synthetic_images(workdir, args.img_size), 'min_agreement': 0.0}
            export_model(model, paths[name], runtime, img_size=args.img_size, precision=args.precision,
                         tune=args.tune, **(int8 if args.precision == 'int8' else {}))
        for batch in (int(b) for b in args.batch_sizes.split(',')):
            x = np.random.default_rng(0).standard_normal((batch, 3, args.img_size, args.img_size), dtype=np.float32)
            print_profiles(runtime, batch, {
                name: profilers[runtime](path, x, args.threads, args.rounds, args.precision)
                for name, path in paths.items()})


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
    parser.add_argument('--precision', choices=sorted(PRECISION_RUNTIMES), default='fp32',
                        help='fp32; bf16 (eager and compile under autocast, OpenVINO); int8 (ONNX Runtime, OpenVINO)')
    parser.add_argument('--no-tune', dest='tune', action='store_false',
                        help="export EPSANet with the fixed rules' branch forms instead of those tuned on this machine")
    parser.add_argument('--profile', action='store_true',
                        help='profile the ONNX Runtime and OpenVINO exports op by op instead of timing them')
    parser.add_argument('--forms', action='store_true',
                        help='time epsanet50 in each exact branch form against resnet50 (ONNX Runtime, OpenVINO)')
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(',') if r]
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        parser.error(f'unknown runtimes {", ".join(sorted(unknown))}; choose from {", ".join(RUNTIMES)}')
    runtimes = [r for r in runtimes if r in PRECISION_RUNTIMES[args.precision]]
    peers = PEERS.get(args.model, ()) if args.peers is None else tuple(p for p in args.peers.split(',') if p)
    baseline = BASELINES[args.model]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {name: timm.create_model(name).eval() for name in (args.model, baseline, *peers)}
    print(f'{machine()}; {args.precision}, {args.img_size} px, random weights, ' +
          (f'{args.rounds} profiled runs' if args.profile else f'medians of {args.rounds} interleaved rounds'))
    cache: Dict = {}
    exported_runtimes = [r for r in runtimes if r in ('onnxruntime', 'openvino')]
    with tempfile.TemporaryDirectory(prefix='bench-runtimes-') as workdir:
        if args.profile:
            profile(args, models, exported_runtimes, Path(workdir))
            return
        print(f'| runtime | precision | batch | model | images/s | vs {baseline} |\n|---|---|---|---|---|---|')
        variants = in_both_memory_formats(models) if {'eager', 'compile'} & set(runtimes) else {}
        for runtime in exported_runtimes if args.forms else runtimes:
            exports = {name: (model, {}) for name, model in models.items()}
            if args.forms:
                exports = {baseline: (models[baseline], {}), **{
                    f'{args.model} {label}': (models[args.model], kwargs)
                    for label, kwargs in uniform_forms(runtime, args.precision).items()}}
            for batch in (int(b) for b in args.batch_sizes.split(',')):
                x = torch.randn(batch, 3, args.img_size, args.img_size)
                if runtime == 'eager':
                    steps = eager_steps(variants, x, args.precision)
                elif runtime == 'compile':
                    steps = compile_steps(variants, x, args.precision)
                else:
                    steps = exported_steps(runtime, exports, x, Path(workdir), args, cache)
                settle = SETTLE_CALLS.get(runtime, 0)
                seconds = time_interleaved(steps, torch.device('cpu'), args.rounds, args.warmup, settle)
                report(runtime, args.precision, batch, seconds, baseline)


if __name__ == '__main__':
    main()
