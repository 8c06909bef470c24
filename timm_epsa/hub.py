"""What ``pretrained=True`` does for EPSANet beyond timm: safetensors only from the Hub, and errors
that say what to do.

The weights load through timm's own path (``build_model_with_cfg`` calls ``load_pretrained``),
which adapts ``num_classes`` / ``in_chans`` and serves ``features_only``. :func:`install` wraps
that one call, for EPSANet architectures only, with two rules:

* from the Hub, weights come only as ``model.safetensors``: timm would otherwise fall back to a
  pickle (``pytorch_model.bin``);
* a load that cannot succeed (no weights published, a missing, private or gated repo, offline
  without a cached copy, a damaged upload, weights of another architecture) raises
  :class:`PretrainedWeightsError` naming the repo and the ways out: never a random init.

Where the weights come from is decided by timm (``_resolve_pretrained_source``); this module asks
it rather than repeating its order of sources. Publishing is in :mod:`timm_epsa.publish`.
"""
import functools
from typing import Any, Callable, Dict, Optional

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
from safetensors import SafetensorError

from timm.models import _builder
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, hf_split

from .checkpoint import CheckpointMismatchError
from .hub_repos import DEFAULT_TAG, NAMESPACE_ENV, configured_namespace, hub_namespace
from .models.epsanet import MODEL_NAMES

__all__ = ['CARD_NAME', 'CONFIG_NAME', 'PretrainedWeightsError', 'WEIGHTS_NAME', 'cached_weights', 'install']

WEIGHTS_NAME = HF_SAFE_WEIGHTS_NAME
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
_HUB_ERRORS = (CheckpointMismatchError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, SafetensorError)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says where they were looked
    for and the ways out."""


def install() -> None:
    """Attach the rules to timm's ``load_pretrained``; other architectures load exactly as before.
    Idempotent."""
    if not getattr(_builder.load_pretrained, '_timm_epsa_rules', False):
        _builder.load_pretrained = _with_epsanet_rules(_builder.load_pretrained)


def _with_epsanet_rules(timm_load_pretrained: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(timm_load_pretrained)
    def load_pretrained(model, pretrained_cfg: Optional[Dict[str, Any]] = None, *args, **kwargs) -> None:
        cfg = pretrained_cfg or getattr(model, 'pretrained_cfg', None) or {}
        model_name = cfg.get('architecture')
        if model_name not in MODEL_NAMES:
            return timm_load_pretrained(model, pretrained_cfg, *args, **kwargs)
        load_from, _ = _builder._resolve_pretrained_source(cfg)
        if not load_from:
            raise PretrainedWeightsError(_no_weights(model_name, cfg.get('tag')))
        if load_from != 'hf-hub':  # a file, folder or state dict the user named: timm's errors name it
            return timm_load_pretrained(model, pretrained_cfg, *args, **kwargs)
        repo_id = cfg['hf_hub_id']
        filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
        if not filename.endswith('.safetensors'):
            raise PretrainedWeightsError(
                f"hf_hub_filename={filename!r} for Hub repo '{repo_id}': weights are loaded from the Hub only as "
                f"safetensors, a pickle is never unpickled. {_ways_out(model_name)}")
        try:
            return timm_load_pretrained(model, {**cfg, 'hf_hub_filename': filename}, *args, **kwargs)
        except _HUB_ERRORS as e:
            raise PretrainedWeightsError(_explain(e, repo_id, filename, model_name)) from e

    load_pretrained._timm_epsa_rules = True
    return load_pretrained


def _no_weights(model_name: str, tag: Optional[str]) -> str:
    tagged = f'{model_name}.{tag or DEFAULT_TAG}'
    return (
        f'No pretrained weights are published for {tagged}: the EPSANet authors released none and this package '
        f'has none yet, so pretrained=True has nothing to load. {_ways_out(model_name)}'
    )


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
