"""Where EPSANet weights live on the Hugging Face Hub: ``<namespace>/<model>.<tag>``.

No EPSANet weights have ever been published (the authors released none), so a registered pretrained
tag points at a Hub repo only where weights can exist for this user: in the namespace
``$TIMM_EPSA_HUB_NAMESPACE`` names (someone who published their own), or in the project's namespace
for the tags listed in :data:`PUBLISHED` (none yet). Elsewhere the tag keeps its metadata and
timm does not list it as pretrained. This module holds only names: the models read it when they
register, :mod:`timm_epsa.hub.pretrained` when it loads.
"""
import os
from typing import FrozenSet, Optional

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..escaping import first_line

__all__ = [
    'DEFAULT_NAMESPACE', 'DEFAULT_TAG', 'NAMESPACE_ENV', 'PUBLISHED', 'check_repo_id', 'configured_namespace',
    'hub_namespace',
    'hub_repo_id', 'registered_repo_id',
]

NAMESPACE_ENV = 'TIMM_EPSA_HUB_NAMESPACE'
DEFAULT_NAMESPACE = 'timm-epsa'
DEFAULT_TAG = 'in1k'
# '<model>.<tag>' whose weights are published in DEFAULT_NAMESPACE. Add a tag here only once its
# repo holds model.safetensors: timm lists every tag with a Hub repo as pretrained.
PUBLISHED: FrozenSet[str] = frozenset()


def configured_namespace() -> Optional[str]:
    """``$TIMM_EPSA_HUB_NAMESPACE`` unchecked, or None: the models register with whatever it is, so
    that a bad value costs pretrained weights only, not the models."""
    return os.environ.get(NAMESPACE_ENV) or None


def hub_namespace() -> str:
    """The Hub user or organisation weights are published to and loaded from: the configured one,
    checked, else :data:`DEFAULT_NAMESPACE`.

    Raises ``ValueError`` naming the variable for a value that cannot be a Hub name.
    """
    namespace = configured_namespace() or DEFAULT_NAMESPACE
    if _hub_name_problem(namespace, slashes=0):
        raise ValueError(
            f"{NAMESPACE_ENV}={namespace!r} is not a Hugging Face user or organisation name (letters, digits, "
            f"'-', '_', '.'; no '/' or spaces): pretrained weights are looked up at '<namespace>/<model>.{DEFAULT_TAG}'"
        )
    return namespace


def check_repo_id(repo_id: str, what: str = '--repo-id') -> str:
    """``repo_id`` if the Hub would accept it as ``<user or organisation>/<name>``, else a ``ValueError``
    that says why, naming it as ``what`` (the argument it was given as): checked before any work,
    not by the Hub."""
    problem = _hub_name_problem(repo_id, slashes=1)
    if problem:
        raise ValueError(
            f"{what} {repo_id!r} is not a repo id the Hub accepts ({problem}); give "
            f"<user or organisation>/<name>, e.g. me/epsanet50.in1k")
    return repo_id


def _hub_name_problem(name: str, slashes: int) -> Optional[str]:
    """Why the Hub would refuse ``name`` (a namespace with no ``/``, a repo id with one), or None."""
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        return first_line(e).rstrip('.')
    if name.count('/') != slashes:
        return 'it must be <user or organisation>/<name>' if slashes else "it must not contain '/'"
    return None


def hub_repo_id(model_name: str, tag: str = DEFAULT_TAG, namespace: Optional[str] = None) -> str:
    """The repo weights of ``model_name`` are published to, in ``namespace`` (default :func:`hub_namespace`)."""
    return f'{namespace or hub_namespace()}/{model_name}.{tag}'


def registered_repo_id(model_name: str, tag: str = DEFAULT_TAG) -> Optional[str]:
    """The repo the registered ``<model_name>.<tag>`` loads from, or None where no weights can exist."""
    namespace = configured_namespace()
    if namespace is not None:
        return f'{namespace}/{model_name}.{tag}'
    if f'{model_name}.{tag}' in PUBLISHED:
        return f'{DEFAULT_NAMESPACE}/{model_name}.{tag}'
    return None
