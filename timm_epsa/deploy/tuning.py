"""Each PSA branch's form chosen by timing the exact candidates on the exporting machine.

Which form of a grouped convolution runs fastest depends on the runtime, the precision and the CPU
(fp32 on AVX-512 favours depthwise decompositions; bf16 on AMX favours dense block-diagonal
weights, whose waste the tile units absorb), so a fixed rule is right on the machine it was
measured on only. For every distinct branch shape of the model (channels, kernel, groups, stride,
input size) the tuner times every exact candidate (:func:`candidate_forms`) in the target runtime
and precision, at batch 1 and 8 for a dynamic-batch export (the fixed batch otherwise), and takes
the one whose time relative to the fastest candidate, averaged over the batch sizes, is lowest (no
batch size is given up for the other), where it beats the fixed rule's form
(:func:`timm_epsa.deploy.forms.branch_form`) by a clear :data:`MARGIN`. A branch timed alone is a
noisy and imperfect witness of the branch in its network (on a shared machine, candidates within
15-20% of each other alone were level or reversed in the network), while a rule measured on a
machine of another kind can be off by 2x (fp32 rules on an AMX CPU in bf16): the margin keeps the
rule where the timing cannot tell, and leaves it where the rule is far off. Choices are kept in
:class:`~timm_epsa.deploy.form_cache.FormCache`, so the next export of any model with those shapes
measures nothing and writes the same file.

Candidates are timed alone, each a small model of its own cut from one export of all of them
(:class:`CandidateBank`): one ``torch.onnx.export`` instead of one per candidate. Tuning stops
after :data:`BUDGET_SECONDS`; shapes left then take the fixed rules of :mod:`timm_epsa.deploy.forms`
and are measured by the next export.

Branches timed alone can still mislead in the network (OpenVINO fp32 on a Xeon: forms each clearly
faster alone made the whole epsanet50 16-19% slower at batch 8), so where the tuned forms differ from
the fixed rules :func:`guard_forms` times both whole models and keeps the tuned forms only where they
are not slower; that decision is cached too.
"""
import hashlib
import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..layers.psa import PyramidSqueezeAttention
from .cpu_info import cpu_flags, cpu_model, usable_cores
from .form_cache import FormCache
from .forms import ONNXRUNTIME, branch_form
from .precision import FP32, INT8, openvino_config
from .psa_graph import BranchForm, BranchGraph
from .runtimes import load_runner
from .tracing import TRACE_BATCH, export_onnx

__all__ = ['BUDGET_SECONDS', 'TUNING_BATCHES', 'BranchShape', 'CandidateBank', 'Timings', 'branch_shapes',
           'candidate_forms', 'choose_forms', 'form_label', 'guard_forms']

TUNING_BATCHES = (1, 8)  # a dynamic-batch export is tuned for both
BUDGET_SECONDS = 300.0
ROUNDS = 7  # timed calls per candidate and batch size
GIVE_UP = 2.0  # a candidate this many times slower than the fastest is timed no more
MARGIN = 0.85  # a candidate replaces the fixed rule's form where it takes less than this share of its time
EVICT_BYTES = 16 << 20  # more than the private (L2) caches of the cores that run a candidate

Timings = Dict[str, Dict[int, float]]  # seconds per call, by candidate label and batch size
Measure = Callable[[Sequence['BranchShape']], Iterator[Tuple['BranchShape', Timings]]]
Forms = Dict[str, BranchForm]  # a form for each PSA branch, by module name
# seconds per call of each whole model ('tuned', 'rules': the model with those forms), by batch size
MeasureModels = Callable[[Dict[str, Forms]], Timings]


@dataclass(frozen=True)
class BranchShape:
    """What a branch's speed depends on: its convolution's geometry and the size of its input."""
    in_chs: int
    out_chs: int
    kernel: Tuple[int, int]
    groups: int
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    height: int
    width: int

    @classmethod
    def of(cls, conv: nn.Conv2d, height: int, width: int) -> 'BranchShape':
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), conv.groups, tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.dilation), height, width)

    def describe(self) -> str:
        kernel, stride = 'x'.join(map(str, self.kernel)), 'x'.join(map(str, self.stride))
        extra = '' if self.dilation == (1, 1) else f' dilation {"x".join(map(str, self.dilation))}'
        return (f'{self.in_chs}->{self.out_chs} {kernel} groups {self.groups} stride {stride} padding '
                f'{"x".join(map(str, self.padding))}{extra} on {self.height}x{self.width}')

    def conv(self) -> nn.Conv2d:
        """A convolution of this shape with random weights (timing does not depend on their values)."""
        return nn.Conv2d(self.in_chs, self.out_chs, self.kernel, self.stride, self.padding, self.dilation,
                         self.groups, bias=False)


def candidate_forms(groups: int) -> Tuple[BranchForm, ...]:
    """Every exact form of a branch with ``groups`` groups: as it is, depthwise convolutions with the
    group sums reduced or as 1x1 convolutions, and block-diagonal weights for each divisor of ``groups``."""
    if groups == 1:
        return (BranchForm(),)
    fewer = tuple(BranchForm(groups=d) for d in range(groups - 1, 0, -1) if groups % d == 0)
    return (BranchForm(), BranchForm(depthwise=True), BranchForm(depthwise=True, sums_as_conv=True)) + fewer


def form_label(form: BranchForm) -> str:
    if form.depthwise:
        return 'depthwise+1x1 sums' if form.sums_as_conv else 'depthwise+reduce sums'
    return 'grouped' if form.groups is None else f'{form.groups} groups (block-diagonal)'


def branch_shapes(model: nn.Module, input_size: Tuple[int, int, int]) -> Dict[str, BranchShape]:
    """The shape of every PSA branch of ``model`` (by module name) for images of ``input_size``,
    found by running the model once on one such image."""
    shapes: Dict[str, BranchShape] = {}
    hooks = []
    for name, psa in model.named_modules():
        if isinstance(psa, PyramidSqueezeAttention):
            for child, conv in psa.named_children():
                if child.startswith('conv_'):
                    def record(module, args, name=f'{name}.{child}' if name else child):
                        shapes[name] = BranchShape.of(module, *args[0].shape[2:])
                    hooks.append(conv.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def choose_forms(
        model: nn.Module,
        runtime: str,
        precision: str,
        input_size: Tuple[int, int, int],
        batch_size: Optional[int] = None,
        cache: Optional[FormCache] = None,
        measure: Optional[Measure] = None,
        clock: Callable[[], float] = time.perf_counter,
        budget: float = BUDGET_SECONDS,
        log: Callable[[str], None] = lambda message: None,
) -> Dict[str, BranchForm]:
    """The tuned form of each PSA branch of ``model`` (by module name): from ``cache`` where it holds
    the shape for this machine, runtime, precision and batch sizes, measured by ``measure`` (the
    runtime, by default) otherwise, until ``budget`` seconds of ``clock`` have passed."""
    batches = (batch_size,) if batch_size else TUNING_BATCHES
    cache = cache or FormCache(log=log)
    shapes = branch_shapes(model, input_size)
    prefix = _key_prefix(runtime, precision, batches)
    entries = cache.load()
    chosen: Dict[BranchShape, BranchForm] = {}
    missing = []
    for shape in dict.fromkeys(shapes.values()):
        entry = entries.get(f'{prefix} | {shape.describe()}')
        labels = {form_label(form): form for form in candidate_forms(shape.groups)}
        if shape.groups == 1:
            chosen[shape] = BranchForm()
        elif isinstance(entry, dict) and entry.get('form') in labels:
            chosen[shape] = labels[entry['form']]
        else:
            missing.append(shape)
    if missing:
        start = clock()
        log(f'tuning {len(missing)} PSA branch shapes for {runtime} in {precision} on this CPU (kept in {cache.path})')
        measure = measure or (lambda todo: CandidateBank(todo, runtime, precision).timings(batches))
        new_entries = {}
        timings = measure(missing)
        for shape, seconds in timings:
            chosen[shape] = _fastest(shape, seconds, branch_form(runtime, shape.conv(), precision))
            new_entries[f'{prefix} | {shape.describe()}'] = {'form': form_label(chosen[shape]), 'seconds': seconds}
            if clock() - start > budget:
                timings.close()
                break
        cache.add(new_entries)
        left = [shape for shape in missing if shape not in chosen]
        log(f'tuned {len(new_entries)} shapes in {clock() - start:.0f} s' + (
            f'; out of time: {len(left)} take the fixed rules, the next export measures them' if left else ''))
    return {name: chosen.get(shape) or branch_form(runtime, shape.conv(), precision)
            for name, shape in shapes.items()}


def guard_forms(
        model: nn.Module,
        runtime: str,
        precision: str,
        input_size: Tuple[int, int, int],
        tuned: Forms,
        export: Callable[[Forms, Path], None],
        batch_size: Optional[int] = None,
        cache: Optional[FormCache] = None,
        measure: Optional[MeasureModels] = None,
        clock: Callable[[], float] = time.perf_counter,
        log: Callable[[str], None] = lambda message: None,
) -> Forms:
    """``tuned`` (from :func:`choose_forms`) where the whole model in those forms is not slower, on
    average over the tuning's batch sizes, than in the fixed rules' forms; the rules' forms otherwise.

    Where ``tuned`` is the rules nothing is timed. Otherwise ``export(forms, path)`` writes each model
    as ONNX and ``measure`` (the runtime, by default) times both as the candidates are timed
    (:func:`_interleaved_seconds`), in the tuning's precision; for int8 the fp32 models are timed in
    fp32, since quantizing a whole model needs calibration images and minutes. The decision is cached
    under the tuning's key and a digest of the branches' names, shapes and tuned forms, so the next
    export of the same model measures nothing."""
    batches = (batch_size,) if batch_size else TUNING_BATCHES
    shapes = branch_shapes(model, input_size)
    rules = {name: branch_form(runtime, shape.conv(), precision) for name, shape in shapes.items()}
    differ = [name for name in shapes if tuned[name] != rules[name]]
    if not differ:
        return tuned
    cache = cache or FormCache(log=log)
    signature = json.dumps([(name, shape.describe(), form_label(tuned[name])) for name, shape in shapes.items()])
    key = (f'{_key_prefix(runtime, precision, batches)} | whole model '
           f'{hashlib.sha256(signature.encode()).hexdigest()[:16]}')
    entry = cache.load().get(key)
    if isinstance(entry, dict) and entry.get('keep') in ('tuned', 'rules'):
        return tuned if entry['keep'] == 'tuned' else rules
    timed_in = FP32 if precision == INT8 else precision
    log(f'the tuned forms differ from the fixed rules in {len(differ)} of {len(shapes)} PSA branches: timing both '
        f'whole models in {runtime} in {timed_in}, batch {",".join(map(str, batches))}')
    start = clock()
    measure = measure or (lambda models: _whole_model_seconds(models, export, runtime, timed_in, input_size, batches))
    seconds = measure({'tuned': tuned, 'rules': rules})
    ratio = sum(seconds['tuned'][b] / seconds['rules'][b] for b in batches) / len(batches)
    keep = 'tuned' if ratio <= 1.0 else 'rules'
    cache.add({key: {'keep': keep, 'seconds': seconds}})
    log(f'timed both whole models in {clock() - start:.0f} s: the tuned forms take {ratio:.2f}x the rules\' time; '
        f'exporting the ' + ('tuned forms' if keep == 'tuned' else 'fixed rules'))
    return tuned if keep == 'tuned' else rules


def _whole_model_seconds(models: Dict[str, Forms], export: Callable[[Forms, Path], None], runtime: str, precision: str,
                         input_size: Tuple[int, int, int], batches: Sequence[int]) -> Timings:
    """Seconds per call of each whole model, exported by ``export`` and timed as candidates are."""
    with tempfile.TemporaryDirectory(prefix='timm-epsa-guard-') as tmp:
        runs = {}
        for label, forms in models.items():
            path = Path(tmp) / f'{label}.onnx'
            export(forms, path)
            runs[label] = load_runner(runtime, path, threads=usable_cores(), precision=precision)
        return _interleaved_seconds(runs, input_size, batches)


def _fastest(shape: BranchShape, seconds: Timings, rule: BranchForm) -> BranchForm:
    """The candidate whose time, relative to the fastest at each batch size, is lowest on average
    (among equals, the earliest in :func:`candidate_forms`' order), if that average is under
    :data:`MARGIN` times the rule's; the rule's form otherwise."""
    forms = [form for form in candidate_forms(shape.groups) if form_label(form) in seconds]
    batches = list(seconds[form_label(forms[0])])
    best = {batch: min(seconds[form_label(form)][batch] for form in forms) for batch in batches}
    score = {form: sum(seconds[form_label(form)][b] / best[b] for b in batches) for form in forms}
    fastest = min(forms, key=score.get)
    return fastest if rule not in score or score[fastest] < MARGIN * score[rule] else rule


def _key_prefix(runtime: str, precision: str, batches: Sequence[int]) -> str:
    return (f'{runtime} {_runtime_version(runtime)} | {precision} | {cpu_model()} | {" ".join(cpu_flags())} | '
            f'{usable_cores()} cores | batch {",".join(map(str, batches))}')


def _runtime_version(runtime: str) -> str:
    return __import__(runtime).__version__


class CandidateBank(nn.Module):
    """Every candidate form of every shape, to be exported once and cut into one small model per
    candidate. Each shape's input passes a 1x1 convolution and a ReLU first, as a branch's input in an
    EPSA block does: the runtime then hands the candidate its input in the layout (and, in int8, the
    quantization) it chooses inside a network, not as a model input arrives."""

    def __init__(self, shapes: Sequence[BranchShape], runtime: str, precision: str):
        super().__init__()
        self.shapes, self.runtime, self.precision = list(shapes), runtime, precision
        self.inputs = nn.ModuleList(nn.Sequential(nn.Conv2d(s.in_chs, s.in_chs, 1), nn.ReLU()) for s in self.shapes)
        self.candidates = nn.ModuleList()
        self.index: List[Tuple[int, str]] = []  # (input, candidate label) of each output
        for i, shape in enumerate(self.shapes):
            conv = shape.conv()
            for form in candidate_forms(shape.groups):
                self.candidates.append(BranchGraph(conv, form, keep_order=False))
                self.index.append((i, form_label(form)))

    def forward(self, inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        branch_inputs = [layer(x) for layer, x in zip(self.inputs, inputs)]
        return tuple(candidate(branch_inputs[i]) for candidate, (i, _) in zip(self.candidates, self.index))

    def timings(self, batches: Sequence[int]) -> Iterator[Tuple[BranchShape, Timings]]:
        """Seconds per call of each candidate at each batch size, shape by shape."""
        with tempfile.TemporaryDirectory(prefix='timm-epsa-tuning-') as tmp:
            path = Path(tmp) / 'bank.onnx'
            examples = tuple(torch.randn(TRACE_BATCH, s.in_chs, s.height, s.width) for s in self.shapes)
            # each input a batch size of its own, so that no candidate reads another's input for its shape
            dims = tuple({0: torch.export.Dim(f'batch{i}', min=1)} for i in range(len(examples)))
            export_onnx(self.eval(), path, (examples,), (dims,),
                        input_names=[f'x{i}' for i in range(len(self.shapes))],
                        output_names=[f'y{j}' for j in range(len(self.index))], rewrite=False)
            if self.precision == INT8:
                path = self._quantized(path)
            runners = _OpenVINOCuts(path, self.precision) if self.runtime != ONNXRUNTIME else _OnnxRuntimeCuts(path)
            for i, shape in enumerate(self.shapes):
                runs = {label: runners.cut(f'x{i}', f'y{j}') for j, (index, label) in enumerate(self.index) if index == i}
                yield shape, _interleaved_seconds(runs, (shape.in_chs, shape.height, shape.width), batches)

    def _quantized(self, path: Path) -> Path:
        """The bank quantized as the export will be (random calibration data: timing ignores values)."""
        from .quantization import quantize_bank
        out = path.with_name('bank-int8' + ('.onnx' if self.runtime == ONNXRUNTIME else '.xml'))
        inputs = [torch.randn(1, s.in_chs, s.height, s.width).numpy() for s in self.shapes]
        quantize_bank(self.runtime, path, out, inputs)
        return out


def _interleaved_seconds(runs: Dict[str, Callable[[np.ndarray], object]], input_size: Tuple[int, int, int],
                         batches: Sequence[int]) -> Timings:
    """Seconds of the fastest timed call of each candidate (on inputs of ``input_size``) at each batch
    size, timed in turn round after round (each call after an untimed one, which settles the previous
    candidate's threads), so that a change in the machine's speed meets every candidate alike. The
    fastest, not the median: on a shared core other processes' time slices land inside calls and only
    add to them (measured: medians at batch 1 of 9-10 ms, about what the same candidates took at batch
    8), so the fastest call is the nearest to the candidate's own time. Before each timed call the
    CPU's private caches are filled with other data: in a network a branch's weights come from the
    shared cache after the layers before it ran, and a candidate whose weights only fit a private
    cache when it runs alone (block-diagonal weights are larger) would look faster than it is. A
    candidate over :data:`GIVE_UP` times the fastest after three rounds cannot win and is not timed
    again."""
    seconds: Timings = {label: {} for label in runs}
    other_data = np.ones(EVICT_BYTES // 8)
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
        times: Dict[str, List[float]] = {label: [] for label in runs}
        for _ in range(ROUNDS):
            for label, run in runs.items():
                if len(times[label]) >= 3 and min(times[label]) > GIVE_UP * min(map(min, filter(None, times.values()))):
                    continue
                run(x)
                other_data *= 1.0
                begin = time.perf_counter()
                run(x)
                times[label].append(time.perf_counter() - begin)
        for label, measured in times.items():
            seconds[label][batch] = min(measured)
    return seconds


class _OnnxRuntimeCuts:
    def __init__(self, path: Path):
        import onnx
        from onnx.utils import Extractor
        self.extractor = Extractor(onnx.load(str(path)))

    def cut(self, input_name: str, output_name: str) -> Callable[[np.ndarray], object]:
        import onnxruntime
        model = self.extractor.extract_model([input_name], [output_name])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = usable_cores(), 1
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
        return lambda x: session.run(None, {input_name: x})


class _OpenVINOCuts:
    def __init__(self, path: Path, precision: str):
        import openvino
        self.core = openvino.Core()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            self.model = self.core.read_model(str(path))
        self.config = {**openvino_config(precision), 'PERFORMANCE_HINT': 'LATENCY',
                       'INFERENCE_NUM_THREADS': usable_cores(), 'NUM_STREAMS': 1}

    def cut(self, input_name: str, output_name: str) -> Callable[[np.ndarray], object]:
        import openvino
        parameter = next(p for p in self.model.get_parameters() if input_name in p.output(0).get_names())
        output = next(o for o in self.model.outputs if output_name in o.get_names())
        request = self.core.compile_model(openvino.Model([output], [parameter]), 'CPU', self.config).create_infer_request()
        return lambda x: request.infer([x])
