"""EPSANet: ResNet with Pyramid Squeeze Attention bottlenecks

Paper: `EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network`
    - https://arxiv.org/abs/2105.14447 (ACCV 2022)
Original code: https://github.com/murufeng/EPSANet (Apache-2.0)

The EPSA block is the ResNet v1.5 bottleneck with its 3x3 conv replaced by a PSA layer, so the
network is timm's ``ResNet`` with a different block; feature extraction, dilation, drop-path and
gradient checkpointing come from there. Keys outside the PSA layer match timm's ResNet and the
official code alike.

Variants:
    * Small (``epsanet50``, ``epsanet101``): kernels (3, 5, 7, 9), groups (1, 4, 8, 16), plain
      ResNet widths; exactly the official code's network.
    * Large (``*_large``): groups 32 in every branch, which needs at least 32 channels per branch,
      so the bottleneck is twice as wide (``base_width=128``). The paper gives no code for it; its
      table's parameter counts (27.90M / 49.59M) are not reached by any configuration the paper
      describes, see README.
"""
import inspect
import math
from typing import Any, Dict, Optional, Type

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_aa, create_attn, get_act_layer
from timm.models import (
    build_model_with_cfg, clean_state_dict, generate_default_cfgs, list_models, register_model, split_model_name_tag)
from timm.models.resnet import ResNet

from ..arguments import whole_number, whole_numbers
from ..escaping import first_line
from ..hub.checkpoint import check_weights
from ..hub.repos import registered_repo_id
from ..layers import PyramidSqueezeAttention

__all__ = ['EPSABottleneck', 'MODEL_NAMES', 'check_config_model_args', 'check_model_name']

# Small is the PSA layer's default schedule; Large keeps its kernels with 32 groups per branch.
LARGE_PSA = dict(groups=(32, 32, 32, 32))


class EPSABottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 conv is a :class:`PyramidSqueezeAttention` layer (the EPSA block).

    Accepts every keyword timm's ``ResNet`` passes to its blocks; ``cardinality`` and ``base_width``
    set the bottleneck width exactly as in timm's ``Bottleneck`` while the PSA branch groups come
    from ``psa_kwargs`` (default: the layer's own, EPSANet Small's).
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            psa_kwargs: Optional[Dict[str, Any]] = None,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = PyramidSqueezeAttention(
            first_planes,
            width,
            stride=1 if use_aa else stride,
            dilation=first_dilation,
            act_layer=act_layer,
            **(psa_kwargs or {}),
            **dd,
        )
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa, **dd)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = create_attn(attn_layer, outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept checkpoints written by the official ``main.py`` as well as plain state dicts, and refuse
    one for another architecture with the tensors that differ, or one whose values the model would
    take silently wrong (:func:`timm_epsa.hub.checkpoint.check_weights`, as ``convert`` checks them).

    The official script saves ``{'epoch', 'state_dict', 'best_prec1', 'optimizer'}`` with keys
    prefixed ``module.`` by DataParallel; its parameter names are otherwise ours. The check runs
    here, before timm adapts the classifier and input conv, because timm loads non-strictly whenever
    it drops the classifier (``num_classes`` changed, ``features_only``) and would then leave a
    foreign backbone silently half-loaded. The names and shapes checked are the backbone's: the
    classifier is left out (timm drops it, or its strict load names one of another size; this filter
    cannot tell which, it does not see ``features_only``), and so is the input conv's shape, which
    timm adapts; the kinds and values of every tensor the model has are checked.
    """
    state_dict = clean_state_dict(state_dict.get('state_dict', state_dict))
    cfg = model.pretrained_cfg
    check_weights(
        state_dict,
        model,
        what=_weights_origin(cfg),
        architecture=cfg.get('architecture', type(model).__name__),
        skip_keys=(f"{cfg['classifier']}.weight", f"{cfg['classifier']}.bias"),
        skip_shapes=(f"{cfg.get('first_conv')}.weight",),
    )
    return state_dict


def _weights_origin(cfg: Dict[str, Any]) -> str:
    """The weights a pretrained load reads, in the order timm picks them (a state dict given, then a
    file or folder, then a Hub repo), for its errors."""
    if cfg.get('state_dict') is None and (cfg.get('file') or cfg.get('hf_hub_id')):
        return str(cfg.get('file') or cfg['hf_hub_id'])
    return 'the checkpoint'


def check_model_args(model_name: str, model_args: Dict[str, Any], where: str) -> None:
    """Refuse an argument of timm's ResNet that EPSANet cannot be built with, before timm fails on it
    deep inside ResNet (a bare AssertionError for an ``output_stride`` of 7) or builds something else
    than asked without a word (three stages for ``layers=(1, 1, 1)``, no classifier for
    ``num_classes=-1``). From a config.json ``block`` and ``act_layer`` can only be names, and
    ``block`` cannot be one."""
    block = model_args.get('block')
    if block is not None and not (isinstance(block, type) and issubclass(block, nn.Module)):
        raise ValueError(
            f"{where}: block={block!r} is not a block class; {model_name} is built of EPSABottleneck blocks, "
            f"remove 'block'")
    _check_act_layer(model_args.get('act_layer'), where)
    for name, minimum in (('num_classes', 0), ('in_chans', 1)):
        if model_args.get(name) is not None:
            whole_number(model_args[name], name, where, minimum=minimum)
    layers = model_args.get('layers')
    if layers is not None and len(whole_numbers(layers, 'layers', where, each='the blocks of each stage')) != 4:
        raise ValueError(
            f'{where}: layers={tuple(layers)} must give the blocks of each of the 4 stages, e.g. (3, 4, 6, 3).')
    output_stride = model_args.get('output_stride')
    if output_stride is not None and output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"{where}: output_stride={output_stride!r} is not one of {', '.join(map(str, OUTPUT_STRIDES))}, the "
            f"strides ResNet can dilate its last stages to.")


OUTPUT_STRIDES = (8, 16, 32)


def _check_act_layer(act_layer: Any, where: str) -> None:
    """An ``act_layer`` as timm's ResNet uses it: a name timm knows, or a class built as
    ``act_layer(inplace=True)``."""
    if act_layer is None:
        return
    fix = "use a name timm.layers.get_act_layer accepts, e.g. 'relu', 'silu' or 'gelu'"
    try:
        act_class = get_act_layer(act_layer)
    except KeyError:
        raise ValueError(f'{where}: act_layer={act_layer!r} is not an activation timm knows; {fix}') from None
    if isinstance(act_layer, str):
        return
    try:
        built = act_class(inplace=True)
    except TypeError as e:
        built = e
    if not isinstance(built, nn.Module):
        raise TypeError(
            f'{where}: act_layer={act_layer!r} does not build an activation module as ResNet builds it, '
            f'act_layer(inplace=True) ({first_line(built) if isinstance(built, TypeError) else type(built).__name__}); '
            f'{fix} (timm\'s own classes take inplace)')


# What an EPSANet is built from: timm's ResNet arguments, and the PSA schedule (see _create_epsanet).
CONSTRUCTOR_ARGS = frozenset(inspect.signature(ResNet.__init__).parameters) - {'self'} | {'psa_kwargs'}


def check_config_model_args(model_name: str, model_args: Dict[str, Any], where: str) -> None:
    """:func:`check_model_args` for the ``model_args`` of a config.json, which timm hands to the model as
    they are: each must also be one of :data:`CONSTRUCTOR_ARGS` (ResNet would fail on another in a traceback)."""
    unknown = sorted(set(model_args) - CONSTRUCTOR_ARGS)
    if unknown:
        names = ', '.join(map(repr, unknown))
        raise ValueError(
            f"{where}: {names} {'is not an argument' if len(unknown) == 1 else 'are not arguments'} {model_name} "
            f"takes (timm's ResNet arguments and psa_kwargs are); remove {'it' if len(unknown) == 1 else 'them'} "
            f"from config.json")
    check_model_args(model_name, model_args, where)


def _create_epsanet(
        variant: str,
        pretrained: bool = False,
        psa_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> ResNet:
    check_model_args(variant, kwargs, where=f'{variant} arguments')
    # Merge rather than replace block_args so that e.g. block_args=dict(attn_layer='se') keeps the
    # variant's PSA schedule.
    kwargs['block_args'] = {'psa_kwargs': psa_kwargs, **(kwargs.get('block_args') or {})}
    kwargs.setdefault('block', EPSABottleneck)
    kwargs.setdefault('zero_init_last', False)  # the official init leaves the last BN at 1
    return build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.14447',
        'paper_name': 'EPSANet: An Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network',
        'origin_url': 'https://github.com/murufeng/EPSANet',
        **kwargs,
    }


MODEL_NAMES = ('epsanet50', 'epsanet101', 'epsanet50_large', 'epsanet101_large')


def check_model_name(value: str) -> str:
    """``value`` if it is a variant's name or ``<name>.<tag>`` with one of its tags; otherwise a
    ValueError naming the choices (timm's own error for a bad tag is a RuntimeError deep in a build)."""
    if not isinstance(value, str):
        raise TypeError(f"model_name={value!r} is not a model name; choose from {', '.join(MODEL_NAMES)}")
    name, tag = split_model_name_tag(value)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {value!r}; choose from {', '.join(MODEL_NAMES)}")
    tags = list_models(name, include_tags=True)
    if tag and value not in tags:
        raise ValueError(f"{name} has no tag {tag!r}; its tags: {', '.join(tags)}")
    return value

# A tag has a Hub repo, and timm lists it as pretrained, only where weights can exist: see
# timm_epsa.hub.repos (read here, when the models register).
default_cfgs = generate_default_cfgs({
    f'{name}.in1k': _cfg(hf_hub_id=registered_repo_id(name, 'in1k')) for name in MODEL_NAMES
})


@register_model
def epsanet50(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 (Small): the official network, 22.56M params."""
    model_args = dict(layers=(3, 4, 6, 3))
    return _create_epsanet('epsanet50', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet101(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 (Small): the official network, 38.90M params."""
    model_args = dict(layers=(3, 4, 23, 3))
    return _create_epsanet('epsanet101', pretrained, **dict(model_args, **kwargs))


@register_model
def epsanet50_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-50 (Large): groups 32 at twice the bottleneck width, 30.10M params (paper's table: 27.90M)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128)
    return _create_epsanet('epsanet50_large', pretrained, psa_kwargs=LARGE_PSA, **dict(model_args, **kwargs))


@register_model
def epsanet101_large(pretrained: bool = False, **kwargs) -> ResNet:
    """EPSANet-101 (Large): groups 32 at twice the bottleneck width, 53.74M params (paper's table: 49.59M)."""
    model_args = dict(layers=(3, 4, 23, 3), base_width=128)
    return _create_epsanet('epsanet101_large', pretrained, psa_kwargs=LARGE_PSA, **dict(model_args, **kwargs))
