"""Shared fixtures; the test process sees EPSANet as a user without a Hub namespace does."""
import os

import pytest

# Read when the models register (at `import timm`): a developer's own namespace must not leak in.
os.environ.pop('TIMM_EPSA_HUB_NAMESPACE', None)


@pytest.fixture(scope='session')
def resnet50_state_dict():
    """Weights of another architecture, for the tests that must see them refused (built once: 1-2 s)."""
    import timm
    return timm.create_model('resnet50').state_dict()
