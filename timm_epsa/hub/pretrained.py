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
  never a random init; so does a ``file`` in the cfg that is missing, a folder or not safetensors;
* the weights' classifier is kept where it has the ``num_classes`` asked for, also where timm's
  rule (the cfg's class count differs) would replace it by a random one; where timm keeps it, one
  of another size is refused naming the ``num_classes`` to pass, or the config.json to correct.

``timm.create_model('hf-hub:<repo>')`` reads the repo's config.json before any architecture is
known, through timm's ``download_from_hf``: there, for every architecture, :func:`install` only
refuses a path-like revision (the one change this package makes to other models' loading); the
``model_args`` of an EPSANet config.json are checked before timm passes them on.

Why these wrappers see every model and cannot see fewer: timm has no per-model hook where weights
or config.json are loaded (``build_model_with_cfg`` calls the module-level ``load_pretrained``), and
it downloads and parses a repo's config.json before it knows the architecture. The revision check
must run before huggingface_hub turns the revision into a path, so it cannot wait for the
architecture; it refuses only revisions that would leave the cache. The other two hand every other
architecture to timm unchanged after one name lookup. Each wrapped function is checked at
:func:`install` against the shape its wrapper relies on, so a timm release that changes one costs
that rule (with a warning), never ``import timm``.

Where the weights come from is decided by timm (``_resolve_pretrained_source``); this module asks
it rather than repeating its order of sources. Publishing is in :mod:`timm_epsa.hub.publish`.
"""
import functools
import inspect
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

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
from .checkpoint import CheckpointError, CheckpointMismatchError, check_source, not_safetensors
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

    These are private functions of timm: each is first checked to still take the parameters its
    wrapper binds and to sit beside the names it calls. One that does not (a timm release changed
    it) is left as timm has it, and one ``RuntimeWarning`` names every rule left out; the models
    still register and load through timm's own path. Nothing here raises: it runs inside
    ``import timm``.
    """
    changed = []
    for rule in _RULES:
        original = getattr(rule.module, rule.name, None)
        if getattr(original, '_timm_epsa_rules', False):
            continue
        problem = _shape_problem(rule, original)
        if problem:
            changed.append(problem)
            continue
        wrapped = rule.wrap(original)
        wrapped._timm_epsa_rules = True
        setattr(rule.module, rule.name, wrapped)
    if changed:
        warnings.warn(
            f"timm-epsa: this timm ({timm.__version__}) changed functions timm-epsa wraps: {'; '.join(changed)}. "
            f'Those rules are left out (see timm_epsa.hub.pretrained): pretrained=True on EPSANet loads through '
            f"timm's own path without them. Install a timm-epsa release made for this timm.", RuntimeWarning)


class _Rule(NamedTuple):
    """A private timm function a wrapper replaces, and what of its shape the wrapper relies on."""

    module: ModuleType
    name: str
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
    leading: Tuple[str, ...]  # the parameters the wrapper takes by position, first and in this order
    reads: Tuple[str, ...] = ()  # parameters the wrapper reads or replaces in the bound call
    calls: Tuple[str, ...] = ()  # other functions of ``module`` the wrapper calls


def _shape_problem(rule: _Rule, original: Optional[Callable[..., Any]]) -> Optional[str]:
    """What about ``original`` differs from what ``rule`` relies on, in a few words; None if nothing."""
    where = f'{rule.module.__name__}.{rule.name}'
    if original is None:
        return f'{where} is gone'
    try:
        parameters = inspect.signature(original).parameters
    except (TypeError, ValueError):
        return f'{where} has no readable signature'
    positional = [
        name for name, parameter in parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
    missing = [name for name in rule.reads if name not in parameters]
    if tuple(positional[:len(rule.leading)]) != rule.leading or missing:
        needs = f"({', '.join(rule.leading)}, ...)" + (f" with {', '.join(rule.reads)}" if rule.reads else '')
        return f"{where} takes ({', '.join(parameters)}) where the rule needs {needs}"
    gone = [name for name in rule.calls if not callable(getattr(rule.module, name, None))]
    if gone:
        return f"{rule.module.__name__} has no {', '.join(gone)}"
    return None


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
        if load_from == 'file':
            _check_weights_file(cfg['file'])
        if load_from != 'hf-hub':  # a file, folder or state dict the user named: timm's errors name it
            try:
                return _load_with_classifier_rules(timm_load_pretrained, call, cfg)
            except SafetensorError as e:  # safetensors' message names no file
                path = location if load_from == 'file' else Path(location) / WEIGHTS_NAME
                raise PretrainedWeightsError(str(not_safetensors(path, e))) from e
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
            return _load_with_classifier_rules(timm_load_pretrained, call, cfg)
        except _HUB_ERRORS as e:
            raise PretrainedWeightsError(_explain(e, hf_hub_id, filename, model_name)) from e

    return load_pretrained


def _load_with_classifier_rules(
        timm_load_pretrained: Callable[..., None],
        call: inspect.BoundArguments,
        cfg: Dict[str, Any],
) -> None:
    """timm's ``load_pretrained`` as bound in ``call``, with two rules for the weights' classifier.

    timm keeps it when the model has the class count of the weights' cfg, and then it must have
    that many classes (else torch's strict load fails in a paragraph about tensor sizes; this says
    what to change). Otherwise timm drops it for a new one, even where it has exactly the requested
    count (``num_classes=10`` with a 10-class file while the cfg says 1000): such a classifier is
    what the user asked for, and is kept.
    """
    model, num_classes, filter_fn = call.arguments['model'], call.arguments['num_classes'], call.arguments['filter_fn']
    classifier = cfg.get('classifier')
    if not classifier or not num_classes:  # no classifier, or none wanted (features_only, num_classes=0)
        return timm_load_pretrained(*call.args, **call.kwargs)
    kept: Dict[str, Any] = {}

    def checked(state_dict: Dict[str, Any], model) -> Dict[str, Any]:
        state_dict = filter_fn(state_dict, model) if filter_fn is not None else state_dict
        name = f'{classifier}.weight'
        weight, slot = state_dict.get(name), getattr(getattr(model, classifier, None), 'weight', None)
        if weight is None or slot is None:
            return state_dict
        if num_classes == cfg.get('num_classes'):  # timm keeps it: it must fit
            if weight.shape != slot.shape:
                raise CheckpointMismatchError('the checkpoint', cfg['architecture'], _classifier_mismatch(
                    name, tuple(weight.shape), tuple(slot.shape), cfg))
        elif weight.shape == slot.shape:  # timm drops it, but it is the classifier asked for
            kept.update({k: state_dict[k] for k in (name, f'{classifier}.bias') if k in state_dict})
        return state_dict

    call.arguments['filter_fn'] = checked
    timm_load_pretrained(*call.args, **call.kwargs)
    if kept:
        model.load_state_dict(kept, strict=False)


def _classifier_mismatch(name: str, shape: Tuple[int, ...], expected: Tuple[int, ...], cfg: Dict[str, Any]) -> str:
    """Why the weights' classifier does not fit and what to change: the config.json that says how many
    classes there are, where the cfg comes from one (``hf-hub:`` and ``local-dir:`` models), else the
    arguments of ``create_model``."""
    classes = shape[0]
    mismatch = f'their classifier {name} {shape} is for {classes} classes'
    if cfg.get('source') == 'local-dir':
        config = f'{Path(cfg["file"]) / CONFIG_NAME}'
    elif cfg.get('source') == 'hf-hub':
        config = f"the {CONFIG_NAME} of Hub repo '{cfg['hf_hub_id']}'"
    else:
        return (f'{mismatch}, the model has {expected}: to keep it, pass num_classes={classes}; for a new '
                f'classifier of another size, pass num_classes=<that size>')
    return (f'{mismatch}, but {config} says "num_classes": {cfg["num_classes"]}: set it to {classes} there, or pass '
            f'num_classes=<your number of classes> for a new classifier')


def _check_weights_file(path: str) -> None:
    """Refuse a ``file`` in the pretrained cfg (``pretrained_cfg_overlay=dict(file=...)``, train.py's
    ``--pretrained-path``) that is not a weights file, in one line: timm raises a bare FileNotFoundError."""
    try:
        check_source(Path(path))
    except CheckpointError as e:
        if Path(path).is_dir():
            fix = f"; or load the folder with timm.create_model('local-dir:{path}', pretrained=True)"
        elif not Path(path).exists():
            relative = '' if Path(path).is_absolute() else f' (relative to {Path.cwd()})'
            fix = f'{relative}; pass the path of a weights file: model.safetensors, a .pth checkpoint'
        else:
            fix = ''
        raise PretrainedWeightsError(f"Cannot load pretrained weights from the cfg's file={path!r}: {e}{fix}") from None


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
    def parse_model_cfg(cfg: Dict[str, Any], *args, **kwargs):
        pretrained_cfg, model_name, model_args = timm_parse_model_cfg(cfg, *args, **kwargs)
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


_RULES = (
    _Rule(_builder, 'load_pretrained', _with_epsanet_rules, leading=('model', 'pretrained_cfg'),
          reads=('num_classes', 'filter_fn'), calls=('_resolve_pretrained_source',)),
    _Rule(_hub, 'download_from_hf', _with_revision_checked, leading=('model_id',)),
    _Rule(_hub, '_parse_model_cfg', _with_model_args_checked, leading=('cfg',)),
)


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
