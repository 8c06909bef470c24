"""What ``pretrained=True`` does for EPSANet beyond timm: safetensors only from the Hub, verified
downloads, and errors that say what to do.

The weights load through timm's own path (``build_model_with_cfg`` calls ``load_pretrained``),
which adapts ``num_classes`` / ``in_chans`` and serves ``features_only``. :func:`install` wraps
that one call, for EPSANet architectures only, with these rules:

* from the Hub, weights come only as ``model.safetensors``: timm would otherwise fall back to a
  pickle (``pytorch_model.bin``);
* they are fetched by :func:`timm_epsa.hub.download.download`: a path-like revision is refused, a
  Hub that does not answer fails within ``HF_HUB_ETAG_TIMEOUT`` (10 s) instead of minutes, and the
  file must match the sha256 the Hub states for it; timm then loads and adapts them as usual;
* a load that cannot succeed (no weights published, a missing, private or gated repo, offline
  without a cached copy, a Hub that cannot be reached, a damaged upload or download, weights of
  another architecture) raises :class:`PretrainedWeightsError` naming the repo and the ways out:
  never a random init.

``timm.create_model('hf-hub:<repo>')`` reads the repo's config.json before any architecture is
known, through timm's ``download_from_hf``: there, for every architecture, :func:`install` only
refuses a path-like revision (the one change this package makes to other models' loading); the
``model_args`` of an EPSANet config.json are checked before timm passes them on.

Where the weights come from is decided by timm (``_resolve_pretrained_source``); this module asks
it rather than repeating its order of sources. Publishing is in :mod:`timm_epsa.hub.publish`.
"""
import functools
import inspect
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import safetensors.torch
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

import timm
from timm.models import _builder, _hub
from timm.models._hub import HF_SAFE_WEIGHTS_NAME

from ..escaping import first_line
from ..models.epsanet import MODEL_NAMES, check_config_model_args
from .checkpoint import CheckpointMismatchError, not_safetensors
from .download import (
    HubFileMismatchError, HubUnreachableError, InvalidRevisionError, TransportError, download, split_repo_revision)
from .repos import DEFAULT_TAG, NAMESPACE_ENV, configured_namespace, hub_namespace

__all__ = ['CARD_NAME', 'CONFIG_NAME', 'PretrainedWeightsError', 'WEIGHTS_NAME', 'cached_weights', 'install']

WEIGHTS_NAME = HF_SAFE_WEIGHTS_NAME
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
_SET_BY_CREATE_MODEL = ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')
_HUB_ERRORS = (
    CheckpointMismatchError, HfHubHTTPError, HFValidationError, HubFileMismatchError, HubUnreachableError,
    LocalEntryNotFoundError, SafetensorError, TransportError,  # the network failing during the download itself
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and cannot be had; the message says where they were looked
    for and the ways out."""


def install() -> None:
    """Attach the rules to timm's ``load_pretrained`` and config.json parsing (EPSANet architectures
    only) and the revision check to its config.json download (every architecture: the revision is
    the user's input before any architecture is known). Idempotent.

    These are private names of timm: where a timm release lacks one, that rule is left out with a
    warning, and the models still register and load through timm's own path.
    """
    for module, name, wrap in (
            (_builder, 'load_pretrained', _with_epsanet_rules),
            (_hub, 'download_from_hf', _with_revision_checked),
            (_hub, '_parse_model_cfg', _with_model_args_checked),
    ):
        original = getattr(module, name, None)
        if original is None:
            warnings.warn(
                f'timm-epsa: this timm ({timm.__version__}) has no {module.__name__}.{name}; pretrained=True on '
                f'EPSANet works without the rule attached there (see timm_epsa.hub)', RuntimeWarning)
        elif not getattr(original, '_timm_epsa_rules', False):
            wrapped = wrap(original)
            wrapped._timm_epsa_rules = True
            setattr(module, name, wrapped)


def _with_epsanet_rules(timm_load_pretrained: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(timm_load_pretrained)

    @functools.wraps(timm_load_pretrained)
    def load_pretrained(model, pretrained_cfg: Optional[Dict[str, Any]] = None, *args, **kwargs) -> None:
        cfg = pretrained_cfg or getattr(model, 'pretrained_cfg', None) or {}
        model_name = cfg.get('architecture')
        if model_name not in MODEL_NAMES:
            return timm_load_pretrained(model, pretrained_cfg, *args, **kwargs)
        load_from, location = _builder._resolve_pretrained_source(cfg)
        if not load_from:
            raise PretrainedWeightsError(_no_weights(model_name, cfg.get('tag')))
        call = signature.bind(model, pretrained_cfg, *args, **kwargs)
        call.apply_defaults()
        call.arguments['filter_fn'] = _classifier_checked(call.arguments['filter_fn'], cfg, call.arguments['num_classes'])
        if load_from != 'hf-hub':  # a file, folder or state dict the user named: timm's errors name it
            try:
                return timm_load_pretrained(*call.args, **call.kwargs)
            except SafetensorError as e:  # but safetensors' do not
                raise not_safetensors(location if load_from == 'file' else Path(location) / WEIGHTS_NAME, e) from e
        hf_hub_id = cfg['hf_hub_id']
        filename = cfg.get('hf_hub_filename') or WEIGHTS_NAME
        if not filename.endswith('.safetensors'):
            raise PretrainedWeightsError(
                f"hf_hub_filename={filename!r} for Hub repo '{hf_hub_id}': weights are loaded from the Hub only as "
                f"safetensors, a pickle is never unpickled. {_ways_out(model_name)}")
        try:
            repo_id, revision = split_repo_revision(hf_hub_id)
            path = download(repo_id, filename, revision, cache_dir=call.arguments.get('cache_dir'))
            # timm loads and adapts them from here on, as it would have after its own download
            call.arguments['pretrained_cfg'] = {
                **cfg, 'source': '', 'state_dict': safetensors.torch.load_file(path, device='cpu')}
            return timm_load_pretrained(*call.args, **call.kwargs)
        except _HUB_ERRORS as e:
            raise PretrainedWeightsError(_explain(e, hf_hub_id, filename, model_name)) from e

    return load_pretrained


def _classifier_checked(
        filter_fn: Optional[Callable[..., Dict[str, Any]]],
        cfg: Dict[str, Any],
        num_classes: int,
) -> Optional[Callable[..., Dict[str, Any]]]:
    """``filter_fn``, and where timm keeps the weights' classifier (the model has the class count of
    the weights' cfg) a check that it has that many classes: else torch's strict load fails in a
    paragraph about tensor sizes. Where timm drops the classifier there is nothing to check."""
    classifier = cfg.get('classifier')
    if num_classes != cfg.get('num_classes') or not classifier:
        return filter_fn

    def checked(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
        state_dict = filter_fn(state_dict, model) if filter_fn is not None else state_dict
        weight, expected = state_dict.get(f'{classifier}.weight'), getattr(model, classifier, None)
        if weight is not None and getattr(expected, 'weight', None) is not None and weight.shape != expected.weight.shape:
            classes = weight.shape[0]
            raise CheckpointMismatchError('the checkpoint', cfg['architecture'], (
                f'their classifier {classifier}.weight {tuple(weight.shape)} is for {classes} classes, the model has '
                f'{tuple(expected.weight.shape)}: to keep it, pass num_classes={classes} and num_classes={classes} in '
                f'pretrained_cfg_overlay; for a new classifier, pass num_classes=<your number of classes>'))
        return state_dict

    return checked


def _with_revision_checked(timm_download_from_hf: Callable[..., str]) -> Callable[..., str]:
    """timm's ``download_from_hf`` (``'org/repo@revision'``, a file name), refusing a revision that
    huggingface_hub would turn into a path outside its cache before it sees it; nothing else changes."""
    @functools.wraps(timm_download_from_hf)
    def download_from_hf(model_id: str, *args, **kwargs) -> str:
        split_repo_revision(model_id)
        return timm_download_from_hf(model_id, *args, **kwargs)

    return download_from_hf


def _with_model_args_checked(timm_parse_model_cfg: Callable[..., Any]) -> Callable[..., Any]:
    """timm's config.json parsing, for EPSANet also checking the ``model_args`` that
    ``create_model`` will pass on: the ones it sets itself would reach the model twice."""
    @functools.wraps(timm_parse_model_cfg)
    def parse_model_cfg(cfg: Dict[str, Any], extra_fields: Dict[str, Any]):
        pretrained_cfg, model_name, model_args = timm_parse_model_cfg(cfg, extra_fields)
        if model_name in MODEL_NAMES:
            where = f"config.json's model_args for {model_name}"
            repeated = [name for name in _SET_BY_CREATE_MODEL if name in (model_args or {})]
            if repeated:
                raise ValueError(
                    f"{where} set {', '.join(repeated)}, which timm.create_model sets itself; remove "
                    f"{'it' if len(repeated) == 1 else 'them'} from config.json")
            check_config_model_args(model_name, model_args or {}, where=where)
        return pretrained_cfg, model_name, model_args

    return parse_model_cfg


def _no_weights(model_name: str, tag: Optional[str]) -> str:
    tagged = f'{model_name}.{tag or DEFAULT_TAG}'
    return (
        f'No pretrained weights are published for {tagged}: the EPSANet authors released none and this package '
        f'has none yet, so pretrained=True has nothing to load. {_ways_out(model_name)}'
    )


def _explain(error: Exception, hf_hub_id: str, filename: str, model_name: str) -> str:
    repo, _, revision = hf_hub_id.partition('@')
    where = f"Hub repo '{repo}'" + (f' at revision {revision!r}' if revision else '')
    url = f'{constants.ENDPOINT}/{repo}'
    ways_out = _ways_out(model_name)
    if isinstance(error, InvalidRevisionError):
        return f'Cannot load {where}: {error}. Give a branch, tag or commit after the @.'
    if isinstance(error, HubUnreachableError):
        return f'Cannot fetch {filename} of {where}: {error}. {ways_out}'
    if isinstance(error, HubFileMismatchError):
        return f'The weights of {where} were refused: {error}.'
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
    return f'Downloading {filename} from {where} failed: {first_line(error)}'


def _ways_out(model_name: str) -> str:
    return (
        f'To get pretrained {model_name}: publish weights you trained with `timm-epsa convert CHECKPOINT OUT_DIR '
        f'--model {model_name}` and `timm-epsa push OUT_DIR <user>/{model_name}.{DEFAULT_TAG}`, then set '
        f"{NAMESPACE_ENV}=<user>; or load a repo or file directly with pretrained_cfg_overlay=dict(hf_hub_id='<repo>') "
        f"or pretrained_cfg_overlay=dict(file='model.safetensors'). pretrained=False gives random init."
    )


def cached_weights(repo_id: str) -> Optional[str]:
    """Path of the repo's weights in the local Hub cache, or None if they were never downloaded."""
    repo, revision = split_repo_revision(repo_id)
    path = try_to_load_from_cache(repo, WEIGHTS_NAME, revision=revision)
    return path if isinstance(path, str) else None
