"""Shared fixtures; the test process sees EPSANet as a user without a Hub namespace does."""
import importlib
import os

import pytest

# Read when the models register (at `import timm`): a developer's own namespace must not leak in.
os.environ.pop('TIMM_EPSA_HUB_NAMESPACE', None)


@pytest.fixture(scope='session')
def resnet50_state_dict():
    """Weights of another architecture, for the tests that must see them refused (built once: 1-2 s)."""
    import timm
    return timm.create_model('resnet50').state_dict()


@pytest.fixture
def hide_package(monkeypatch):
    """``hide_package(name)``: from then on ``importlib.import_module(name)`` fails as it does where
    the package is not installed (how the export checks for its runtimes)."""
    real_import = importlib.import_module

    def hide(package: str) -> None:
        def import_module(name, *args):
            if name == package:
                raise ImportError(f'No module named {name!r}')
            return real_import(name, *args)
        monkeypatch.setattr(importlib, 'import_module', import_module)
    return hide


class StandInTimings:
    """What :func:`untimed_tuning`'s stand-ins report: with ``rules_fastest`` every candidate form
    takes twice as long as the fixed rules' choice (which the tuner then picks), otherwise half as
    long; a whole model in the tuned forms takes ``tuned_over_rules`` times the rules' model's time.
    ``whole_models`` lists the forms of each pair of whole models compared."""

    def __init__(self):
        self.rules_fastest, self.tuned_over_rules, self.whole_models = True, 1.0, []


@pytest.fixture
def untimed_tuning(monkeypatch, tmp_path_factory):
    """Exports tune into a cache of the test's own, never the user's, and time nothing: branch
    candidates and whole models take what a :class:`StandInTimings` (the fixture's value) says (the
    tuner itself is tested in test_tuning.py)."""
    from timm_epsa.deploy import form_cache, graph_export, tuning
    from timm_epsa.deploy.forms import branch_form

    stand_ins = StandInTimings()

    def stand_in_candidates(model, runtime, precision, *args, **kwargs):
        def measure(shapes):
            for shape in shapes:
                rule = tuning.form_label(branch_form(runtime, shape.conv(), precision))
                slower = 2.0 if stand_ins.rules_fastest else 0.5
                yield shape, {tuning.form_label(form): {1: 1.0 if tuning.form_label(form) == rule else slower}
                              for form in tuning.candidate_forms(shape.groups)}
        return tuning.choose_forms(model, runtime, precision, *args, measure=measure, **kwargs)

    def stand_in_whole_models(*args, batch_size=None, **kwargs):
        def measure(models):
            stand_ins.whole_models.append(models)
            batches = (batch_size,) if batch_size else tuning.TUNING_BATCHES
            return {'tuned': {b: stand_ins.tuned_over_rules for b in batches}, 'rules': {b: 1.0 for b in batches}}
        return tuning.guard_forms(*args, batch_size=batch_size, measure=measure, **kwargs)

    cache = tmp_path_factory.mktemp('cache') / form_cache.CACHE_NAME
    monkeypatch.setattr(form_cache, 'default_cache_path', lambda: cache)
    monkeypatch.setattr(graph_export, 'choose_forms', stand_in_candidates)
    monkeypatch.setattr(graph_export, 'guard_forms', stand_in_whole_models)
    return stand_ins
