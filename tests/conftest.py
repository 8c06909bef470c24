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
