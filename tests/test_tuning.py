"""Tuning the PSA branch forms on the exporting machine: every candidate is exact, the choice follows
the timings, the cache makes it repeatable, the budget bounds it, concurrent exports share the cache.
Timings are stand-ins (no test depends on how fast this machine is), except one smoke run of the
real runtime's timing."""
import json
import random
import threading

import pytest
import timm
import torch
from torch import nn

from numerics import assert_relative_close
from timm_epsa.deploy.form_cache import FormCache
from timm_epsa.deploy.graph_export import _export_onnx
from timm_epsa.deploy.forms import branch_form
from timm_epsa.deploy.psa_graph import BranchForm, PSAGraph
from timm_epsa.deploy import tuning
from timm_epsa.deploy.rewrite import rewrite_psa
from timm_epsa.deploy.tuning import BranchShape, CandidateBank, branch_shapes, candidate_forms, choose_forms, form_label
from timm_epsa.layers import PyramidSqueezeAttention

EXACT = 1e-12  # float64: only summation order differs
GROUPS = (1, 4, 8, 16)


@pytest.fixture(autouse=True)
def runtime_versions_without_the_runtimes(monkeypatch):
    """The cache key holds the runtime's version: the tuner's own tests run where no runtime is
    installed (the lowest-versions suite has none)."""
    monkeypatch.setattr(tuning, '_runtime_version', lambda runtime: '0.0-test')


def tiny_epsanet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('epsanet50', layers=(1, 1, 1, 1), num_classes=10).eval()


def test_candidates_are_every_exact_form():
    assert [form_label(f) for f in candidate_forms(8)] == [
        'grouped', 'depthwise+reduce sums', 'depthwise+1x1 sums', '4 groups (block-diagonal)',
        '2 groups (block-diagonal)', '1 groups (block-diagonal)']
    assert len(candidate_forms(16)) == 3 + 4 and candidate_forms(1) == (BranchForm(),)
    assert len({form_label(f) for f in candidate_forms(12)}) == len(candidate_forms(12)) == 3 + 5  # 6, 4, 3, 2, 1


@pytest.mark.parametrize('keep_order', [True, False])
def test_every_candidate_form_is_exact_against_the_eager_layer(keep_order):
    """Branch i takes its candidates in turn, so every candidate of every branch is computed, with the
    BatchNorm folded and the branch orders left to the consumer or kept."""
    torch.manual_seed(0)
    psa = PyramidSqueezeAttention(32, 64, stride=2, kernel_sizes=(3, 5, 7, 9), groups=GROUPS).double().eval()
    norm = nn.BatchNorm2d(64).double().eval()
    norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(-1.5, 1.5)
    x = torch.randn(2, 32, 13, 13, dtype=torch.float64)
    candidates = [candidate_forms(g) for g in GROUPS]
    with torch.no_grad():
        expected = norm(psa(x))
        for turn in range(max(map(len, candidates))):
            forms = [options[min(turn, len(options) - 1)] for options in candidates]
            graph = PSAGraph(psa, forms, norm=norm, keep_order=keep_order)
            assert_relative_close(graph(x), expected[:, graph.out_order], rel=EXACT, msg=str(forms))


def test_branch_shapes_name_every_branch_with_its_input_size():
    shapes = branch_shapes(tiny_epsanet(), (3, 64, 64))
    assert len(shapes) == 4 * 4  # four blocks, four branches
    assert shapes['layer1.0.conv2.conv_4'] == BranchShape(64, 16, (9, 9), 16, (1, 1), (4, 4), (1, 1), 16, 16)
    assert shapes['layer2.0.conv2.conv_2'].stride == (2, 2) and shapes['layer2.0.conv2.conv_2'].height == 16


def fake_timings(shape: BranchShape):
    """The native form fastest at batch 1, the block-diagonal form with the fewest groups fastest at
    batch 8 and second at batch 1: on average over both, the block-diagonal one wins."""
    labels = [form_label(f) for f in candidate_forms(shape.groups)]
    seconds = {label: {1: 3.0, 8: 30.0} for label in labels}
    seconds['grouped'] = {1: 1.0, 8: 40.0}
    seconds[labels[-1]] = {1: 1.2, 8: 10.0}
    return seconds


class FakeMeasure:
    """Measures by :func:`fake_timings`, each shape taking ``seconds_each`` of a fake clock."""

    def __init__(self, seconds_each: float = 1.0):
        self.now, self.seconds_each, self.measured = 0.0, seconds_each, []

    def clock(self) -> float:
        return self.now

    def __call__(self, shapes):
        for shape in shapes:
            self.now += self.seconds_each
            self.measured.append(shape)
            yield shape, fake_timings(shape)


def test_the_choice_follows_the_timings_over_both_batch_sizes_and_is_cached(tmp_path):
    model, cache = tiny_epsanet(), FormCache(tmp_path / 'forms.json')
    measure = FakeMeasure()
    forms = choose_forms(model, 'openvino', 'bf16', (3, 64, 64), cache=cache, measure=measure, clock=measure.clock)
    grouped = {name for name, shape in branch_shapes(model, (3, 64, 64)).items() if shape.groups > 1}
    assert {name: forms[name] for name in grouped} == {name: BranchForm(groups=1) for name in grouped}
    assert all(forms[name] == BranchForm() for name in set(forms) - grouped)
    assert len(measure.measured) == len(set(measure.measured)) == 12  # each distinct grouped shape once
    entries = json.loads(cache.path.read_text())['entries']
    assert len(entries) == 12 and all(' | bf16 | ' in key and ' | batch 1,8 | ' in key for key in entries)

    def no_measuring(shapes):
        raise AssertionError(f'measured {shapes} again')
        yield
    again = choose_forms(model, 'openvino', 'bf16', (3, 64, 64), cache=cache, measure=no_measuring)
    assert again == forms
    # another precision, runtime or batch size is another measurement
    for runtime, precision, batch in [('openvino', 'fp32', None), ('onnxruntime', 'int8', None), ('openvino', 'bf16', 4)]:
        other = FakeMeasure()
        choose_forms(model, runtime, precision, (3, 64, 64), batch, cache=cache, measure=other, clock=other.clock)
        assert len(other.measured) == 12


@pytest.mark.parametrize('other, chosen', [(0.9, 'rule'), (0.8, 'other')])
def test_only_a_clearly_faster_candidate_replaces_the_rule(tmp_path, other, chosen):
    """Timings within the noise of one branch timed alone keep the measured rule."""
    model = tiny_epsanet()
    shape = branch_shapes(model, (3, 64, 64))['layer1.0.conv2.conv_4']
    rule = branch_form('openvino', shape.conv(), 'bf16')
    faster = next(form for form in candidate_forms(shape.groups) if form != rule)

    def measure(shapes):
        for s in shapes:
            yield s, {form_label(f): {1: {rule: 1.0, faster: other}.get(f, 2.0)} for f in candidate_forms(s.groups)}
    forms = choose_forms(model, 'openvino', 'bf16', (3, 64, 64), cache=FormCache(tmp_path / 'forms.json'),
                         measure=measure)
    assert forms['layer1.0.conv2.conv_4'] == (rule if chosen == 'rule' else faster)


def test_a_fixed_batch_is_tuned_for_that_batch_only(tmp_path):
    measure = FakeMeasure()
    calls = []

    def at_batch_8(shapes):
        for shape, seconds in measure(shapes):
            calls.append(shape)
            yield shape, {label: {8: by_batch[8]} for label, by_batch in seconds.items()}
    forms = choose_forms(tiny_epsanet(), 'openvino', 'bf16', (3, 64, 64), batch_size=8,
                         cache=FormCache(tmp_path / 'forms.json'), measure=at_batch_8)
    assert forms['layer1.0.conv2.conv_4'] == BranchForm(groups=1) and len(calls) == 12


def test_tuning_stops_at_its_budget_and_leaves_the_rest_to_the_rules(tmp_path):
    model, cache, logs = tiny_epsanet(), FormCache(tmp_path / 'forms.json'), []
    measure = FakeMeasure(seconds_each=100.0)
    forms = choose_forms(model, 'onnxruntime', 'fp32', (3, 64, 64), cache=cache, measure=measure, clock=measure.clock,
                         budget=250.0, log=logs.append)
    assert len(measure.measured) == 3  # the third pushes the clock past the budget
    assert len(json.loads(cache.path.read_text())['entries']) == 3
    shapes = branch_shapes(model, (3, 64, 64))
    for name, shape in shapes.items():
        expected = BranchForm(groups=1) if shape in measure.measured else branch_form('onnxruntime', shape.conv())
        assert forms[name] == expected, name
    assert 'out of time: 9 take the fixed rules' in logs[-1]


def test_a_broken_or_unwritable_cache_costs_a_measurement_not_the_export(tmp_path):
    logs = []
    broken = tmp_path / 'forms.json'
    broken.write_text('{not json')
    measure = FakeMeasure()
    choose_forms(tiny_epsanet(), 'openvino', 'fp32', (3, 64, 64), cache=FormCache(broken, log=logs.append),
                 measure=measure)
    assert len(measure.measured) == 12 and 'not read' in logs[0]
    assert len(json.loads(broken.read_text())['entries']) == 12  # replaced by a good one
    blocked = tmp_path / 'file' / 'forms.json'
    (tmp_path / 'file').write_text('a file where the cache folder would be')
    measure = FakeMeasure()
    forms = choose_forms(tiny_epsanet(), 'openvino', 'fp32', (3, 64, 64), cache=FormCache(blocked, log=logs.append),
                         measure=measure)
    assert len(forms) == 16 and 'not written' in logs[-1]


def test_exports_writing_the_cache_at_once_keep_every_entry(tmp_path):
    """Writers each with their own lock file descriptor, as separate processes have them (flock does
    not tell threads from processes)."""
    path = tmp_path / 'forms.json'

    def add_entries(worker: int) -> None:
        cache = FormCache(path)
        for i in range(20):
            cache.add({f'{worker}-{i}': {'form': 'grouped'}})
    workers = [threading.Thread(target=add_entries, args=(w,)) for w in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert set(FormCache(path).load()) == {f'{w}-{i}' for w in range(6) for i in range(20)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.forms.json.lock', 'forms.json']


@pytest.mark.slow
@pytest.mark.parametrize('runtime, precision', [('onnxruntime', 'fp32'), ('openvino', 'int8')])
def test_the_runtime_times_every_candidate_of_a_shape(runtime, precision):
    """The real measurement, on a small shape: each candidate cut from one export of the bank, run
    (quantized for int8), timed at both batch sizes; which one wins is this machine's business."""
    pytest.importorskip(runtime)
    if precision == 'int8' and runtime == 'openvino':
        pytest.importorskip('nncf')
    shapes = [BranchShape(16, 8, (5, 5), 4, (1, 1), (2, 2), (1, 1), 12, 12),
              BranchShape(16, 8, (3, 3), 2, (2, 2), (1, 1), (1, 1), 12, 12)]
    measured = list(CandidateBank(shapes, runtime, precision).timings((1, 8)))
    assert [shape for shape, _ in measured] == shapes
    for shape, seconds in measured:
        assert list(seconds) == [form_label(f) for f in candidate_forms(shape.groups)]
        assert all(set(by_batch) == {1, 8} and all(0 < s < 10 for s in by_batch.values())
                   for by_batch in seconds.values())


def test_rewrite_takes_the_form_chosen_for_each_branch_by_name():
    model = tiny_epsanet()
    chosen = {name: random.Random(name).choice(candidate_forms(shape.groups))
              for name, shape in branch_shapes(model, (3, 32, 32)).items()}
    graph = rewrite_psa(model.double(), lambda name, conv: chosen[name])
    branches = graph.layer3[0].conv2.branches  # reversed: conv_4 first
    assert [b.depthwise for b in branches] == [chosen[f'layer3.0.conv2.conv_{i}'].depthwise for i in (4, 3, 2, 1)]
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_relative_close(graph(x), model(x), rel=EXACT)


def test_a_candidate_slowed_by_other_processes_in_most_calls_is_timed_by_its_fastest(monkeypatch):
    """On a shared core other processes' time slices land inside calls: a candidate of 1 ms slowed to
    10 ms in four of seven calls had a median of 10 ms and lost to one of 2 ms."""
    clock = [0.0]
    monkeypatch.setattr(tuning.time, 'perf_counter', lambda: clock[0])
    preempted = iter([False, True, True, False, True, False, True] * 4)

    def run(seconds, slowed=False):
        def call(x):
            clock[0] += 10.0 if slowed and next(preempted) else seconds
        return call

    runs = {'fast, often preempted': run(1.0, slowed=True), 'slow': run(2.0)}
    timings = tuning._interleaved_seconds(runs, (4, 4, 4), (1,))
    assert timings == {'fast, often preempted': {1: 1.0}, 'slow': {1: 2.0}}


def tuned_and_rules(cache: FormCache):
    """(model, tuned, rules): the tuned forms (block-diagonal, by :func:`fake_timings`) differ from the rules."""
    model, measure = tiny_epsanet(), FakeMeasure()
    tuned = choose_forms(model, 'openvino', 'fp32', (3, 32, 32), cache=cache, measure=measure, clock=measure.clock)
    rules = {name: branch_form('openvino', shape.conv(), 'fp32')
             for name, shape in branch_shapes(model, (3, 32, 32)).items()}
    assert tuned != rules
    return model, tuned, rules


class FakeWholeModels:
    """Times whole models as ``tuned`` and ``rules`` say (seconds by batch size), each comparison taking 30 s
    of a fake clock; the export is never called."""

    def __init__(self, tuned, rules):
        self.now, self.seconds, self.compared = 0.0, {'tuned': tuned, 'rules': rules}, []

    def clock(self) -> float:
        return self.now

    def __call__(self, models):
        self.now += 30.0
        self.compared.append(models)
        return self.seconds

    @staticmethod
    def export(forms, path):
        raise AssertionError('exported a whole model for timing: the stand-in measure must not')


@pytest.mark.parametrize('tuned_seconds, keep', [
    ({1: 1.1, 8: 0.95}, 'rules'), ({1: 0.98, 8: 1.0}, 'tuned'),
    ({1: 1.05, 8: 0.9}, 'tuned'),  # slower at batch 1 alone, faster on average
])
def test_tuned_forms_slower_in_the_whole_model_give_way_to_the_rules(tmp_path, tuned_seconds, keep):
    """On average over the batch sizes: 1.1x at batch 1 is not made up by 0.95x at batch 8."""
    cache, logs = FormCache(tmp_path / 'forms.json'), []
    model, tuned, rules = tuned_and_rules(cache)
    measure = FakeWholeModels(tuned_seconds, {1: 1.0, 8: 1.0})
    forms = tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), tuned, FakeWholeModels.export, cache=cache,
                               measure=measure, clock=measure.clock, log=logs.append)
    assert forms == (rules if keep == 'rules' else tuned)
    assert measure.compared == [{'tuned': tuned, 'rules': rules}]
    assert 'timing both whole models in openvino in fp32, batch 1,8' in logs[0]
    assert 'timed both whole models in 30 s' in logs[1]
    assert logs[1].endswith('fixed rules' if keep == 'rules' else 'tuned forms')


def test_the_whole_model_decision_is_cached(tmp_path):
    cache = FormCache(tmp_path / 'forms.json')
    model, tuned, rules = tuned_and_rules(cache)
    measure = FakeWholeModels({1: 2.0, 8: 2.0}, {1: 1.0, 8: 1.0})
    first = tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), tuned, FakeWholeModels.export, cache=cache,
                               measure=measure, clock=measure.clock)

    def no_measuring(models):
        raise AssertionError('timed the whole models again')
    again = tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), tuned, FakeWholeModels.export, cache=cache,
                               measure=no_measuring)
    assert first == again == rules
    # other tuned forms are another comparison
    other = dict(tuned, **{'layer1.0.conv2.conv_4': BranchForm(depthwise=True)})
    tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), other, FakeWholeModels.export, cache=cache,
                       measure=measure, clock=measure.clock)
    assert len(measure.compared) == 2


def test_tuned_forms_that_are_the_rules_time_nothing_more(tmp_path):
    cache, logs = FormCache(tmp_path / 'forms.json'), []
    model = tiny_epsanet()
    rules = {name: branch_form('openvino', shape.conv(), 'fp32')
             for name, shape in branch_shapes(model, (3, 32, 32)).items()}

    def no_measuring(models):
        raise AssertionError('timed whole models whose forms are the same')
    forms = tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), dict(rules), FakeWholeModels.export,
                               cache=cache, measure=no_measuring, log=logs.append)
    assert forms == rules and logs == [] and not cache.path.exists()


@pytest.mark.slow
def test_the_runtime_times_both_whole_models(tmp_path):
    """The real comparison, as export_model runs it: both models exported and timed in the runtime, the
    decision and its timings cached."""
    pytest.importorskip('openvino')
    cache = FormCache(tmp_path / 'forms.json')
    model, tuned, rules = tuned_and_rules(cache)

    def export(forms, path):
        _export_onnx(rewrite_psa(model, lambda name, conv: forms[name]), path, (3, 32, 32), None)
    forms = tuning.guard_forms(model, 'openvino', 'fp32', (3, 32, 32), tuned, export, cache=cache)
    assert forms in (tuned, rules)
    (entry,) = [value for key, value in cache.load().items() if 'whole model' in key]
    assert entry['keep'] == ('tuned' if forms == tuned else 'rules')
    for label in ('tuned', 'rules'):
        assert {int(batch) for batch in entry['seconds'][label]} == set(tuning.TUNING_BATCHES)
        assert all(0 < seconds < 10 for seconds in entry['seconds'][label].values())
