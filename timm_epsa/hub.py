"""Where EPSANet weights live on the Hugging Face Hub and how ``pretrained=True`` fetches them.

The pretrained cfgs point at ``<namespace>/<model>.in1k`` and timm downloads from there through its
own loading path, which keeps ``num_classes`` / ``in_chans`` adaptation and ``features_only``
working. This module adds what timm does not do:

* downloads are pinned to ``model.safetensors``: timm would otherwise fall back to unpickling a
  ``pytorch_model.bin``, and nothing from the Hub is unpickled here;
* a missing, private, damaged or unreachable repo fails with an error that names the repo and says
  what to do, because until someone publishes weights that is what ``pretrained=True`` meets.

It is imported with the models, so it stays light; publishing is in :mod:`timm_epsa.publish`.
"""
import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Union

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from timm.models import PretrainedCfg, resolve_pretrained_cfg
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, hf_split

from .checkpoint import CheckpointMismatchError

__all__ = [
    'DEFAULT_NAMESPACE', 'NAMESPACE_ENV', 'PretrainedWeightsError', 'WEIGHTS_NAME', 'cached_weights',
    'configured_namespace', 'explain_load_errors', 'hub_namespace', 'hub_repo_id', 'hub_repo_to_load',
    'pretrained_cfg_for_loading',
]

NAMESPACE_ENV = 'TIMM_EPSA_HUB_NAMESPACE'
DEFAULT_NAMESPACE = 'timm-epsa'
DEFAULT_TAG = 'in1k'
WEIGHTS_NAME = HF_SAFE_WEIGHTS_NAME
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says where they were looked
    for and the ways out."""


def configured_namespace() -> str:
    """``$TIMM_EPSA_HUB_NAMESPACE``, else ``timm-epsa``, unchecked: the models register with it
    whatever it is, so that a bad value costs pretrained weights only, not the models."""
    return os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


def hub_namespace() -> str:
    """The Hub user or organisation that hosts the weights, :func:`configured_namespace` checked.

    Raises ``ValueError`` naming the variable for a value that cannot be a Hub name.
    """
    namespace = configured_namespace()
    try:
        validate_repo_id(namespace)
        valid = '/' not in namespace
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(
            f"{NAMESPACE_ENV}={namespace!r} is not a Hugging Face user or organisation name (letters, digits, "
            f"'-', '_', '.'; no '/' or spaces): pretrained weights are looked up at '<namespace>/<model>.{DEFAULT_TAG}'"
        )
    return namespace


def hub_repo_id(model_name: str, tag: str = DEFAULT_TAG, namespace: Optional[str] = None) -> str:
    """The repo ``create_model(model_name + '.' + tag, pretrained=True)`` downloads from, in
    ``namespace`` (default :func:`hub_namespace`)."""
    return f'{namespace or hub_namespace()}/{model_name}.{tag}'


def hub_repo_to_load(cfg: PretrainedCfg) -> Optional[str]:
    """The Hub repo timm will download ``cfg``'s weights from, or None when a state dict, a file or a
    local folder takes precedence (timm's order of sources)."""
    if cfg.source == 'hf-hub':
        return cfg.hf_hub_id
    if cfg.source == 'local-dir' or cfg.state_dict is not None or cfg.file:
        return None
    return cfg.hf_hub_id or None


def pretrained_cfg_for_loading(
        variant: str,
        pretrained_cfg: Union[None, str, Dict[str, Any], PretrainedCfg] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> PretrainedCfg:
    """Resolve the cfg as timm does and, when it points at the Hub, pin the download to safetensors.

    ``hf-hub:`` configs (``config.json`` drops the file name) and overlays naming a pickle would
    otherwise let timm fetch and unpickle ``pytorch_model.bin``.
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    repo_id = hub_repo_to_load(cfg)
    if repo_id is None:
        return cfg
    filename = cfg.hf_hub_filename or WEIGHTS_NAME
    if not filename.endswith('.safetensors'):
        raise PretrainedWeightsError(
            f"hf_hub_filename={filename!r} for Hub repo '{repo_id}': weights are loaded from the Hub only as "
            f"safetensors, a pickle is never unpickled. {_ways_out(cfg.architecture or variant)}"
        )
    return dataclasses.replace(cfg, hf_hub_filename=filename, custom_load=False)


@contextmanager
def explain_load_errors(cfg: PretrainedCfg) -> Iterator[None]:
    """Turn what a failed download or load from the Hub raises into a :class:`PretrainedWeightsError`."""
    repo_id = hub_repo_to_load(cfg)
    try:
        yield
    except (CheckpointMismatchError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, SafetensorError) as e:
        if repo_id is None:
            raise
        raise PretrainedWeightsError(_explain(e, repo_id, cfg.hf_hub_filename or WEIGHTS_NAME, cfg.architecture)) from e


def _explain(error: Exception, repo_id: str, filename: str, model_name: str) -> str:
    repo, revision = hf_split(repo_id)
    where = f"Hub repo '{repo}'" + (f' at revision {revision!r}' if revision else '')
    url = f'{constants.ENDPOINT}/{repo}'
    ways_out = _ways_out(model_name)
    if isinstance(error, CheckpointMismatchError):
        return f'The weights in {where} do not fit {model_name}: {error.details}. {ways_out}'
    if isinstance(error, GatedRepoError):
        return f'{where} ({url}) is gated: request access on its page and log in (`hf auth login` or HF_TOKEN).'
    if isinstance(error, RepositoryNotFoundError):
        return f'No weights are published at {where} ({url}): the repo does not exist or is private. {ways_out}'
    if isinstance(error, RevisionNotFoundError):
        return f'No weights are published at {where} ({url}): it has no such revision. {ways_out}'
    if isinstance(error, RemoteEntryNotFoundError):
        return (
            f'No weights are published at {where} ({url}): it has no {filename}. Weights are loaded from the Hub '
            f'only as safetensors and a pickle (pytorch_model.bin) is never unpickled; `timm-epsa convert` turns '
            f'one into safetensors. {ways_out}'
        )
    if isinstance(error, LocalEntryNotFoundError):
        reason = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub cannot be reached'
        return (
            f'Cannot fetch {filename} of {where}: {reason} and it is not in the local cache '
            f'({constants.HF_HUB_CACHE}). Load it once online to cache it. {ways_out}'
        )
    if isinstance(error, SafetensorError):
        return (
            f'The {filename} in {where} is not a valid safetensors file ({error}): the upload is damaged. '
            f'Whoever publishes it must upload it again (`timm-epsa convert`, then `timm-epsa push`).'
        )
    if isinstance(error, HFValidationError):
        if repo.startswith(f'{configured_namespace()}/'):
            try:
                hub_namespace()
            except ValueError as bad_namespace:
                return f'{bad_namespace}. {ways_out}'
        return f"'{repo}' is not a valid Hub repo id: {error}"
    return f"Downloading {filename} from {where} failed: {(str(error).strip().splitlines() or [''])[0]}"


def _ways_out(model_name: str) -> str:
    return (
        f'To get pretrained {model_name}: publish weights you trained with `timm-epsa convert CHECKPOINT OUT_DIR '
        f'--model {model_name}` and `timm-epsa push OUT_DIR <user>/{model_name}.{DEFAULT_TAG}`, then set '
        f"{NAMESPACE_ENV}=<user>; or load a repo or file directly with pretrained_cfg_overlay=dict(hf_hub_id='<repo>') "
        f"or pretrained_cfg_overlay=dict(file='model.safetensors'). pretrained=False gives random init."
    )


def cached_weights(repo_id: str) -> Optional[str]:
    """Path of the repo's weights in the local Hub cache, or None if they were never downloaded."""
    repo, revision = hf_split(repo_id)
    path = try_to_load_from_cache(repo, WEIGHTS_NAME, revision=revision)
    return path if isinstance(path, str) else None
