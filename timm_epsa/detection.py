"""EPSANet + FPN detectors on torchvision: the paper's COCO setups (Faster R-CNN, Mask R-CNN, RetinaNet).

The paper trained them with mmdetection on a "pytorch"-style backbone (the stride sits on the
3x3 layer, here PSA, as in ResNet v1.5 and EPSANet itself) under a 256-channel FPN: Faster and
Mask R-CNN take stages 1-4 (strides 4-32) plus a max-pooled P6, RetinaNet takes stages 2-4 plus P6
and P7 from extra stride-2 convolutions, P6 on C5 (mmdetection's ``add_extra_convs='on_input'``,
torchvision's ``retinanet_resnet50_fpn_v2`` neck). The builders follow torchvision's
``*_resnet50_fpn`` ones and return torchvision's own detector classes, so training, evaluation and
export are torchvision's.

The backbone is ``timm.create_model(model_name, features_only=True)``: pretrained weights come
through timm's loading (the Hub policy, ``pretrained_cfg_overlay``, and the errors that say where no
weights are published) and any timm keyword argument reaches the network. As in torchvision,
``trainable_layers`` freezes the stem and the first stages, and BatchNorm is frozen (statistics and
affine parameters become constants) when the backbone is pretrained, the way detectors fine-tune at
small per-GPU batches; the defaults follow whether it is: 3 trainable layers and frozen BatchNorm
for a pretrained backbone (mmdetection's ``frozen_stages=1``), everything trainable otherwise.

Every argument is checked before anything is built (:mod:`timm_epsa.arguments`), and refused in one
line naming it as the builder the user called names it.
"""
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Type

import timm
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7)

from .arguments import flag, whole_number, whole_numbers
from .models.epsanet import check_model_name

__all__ = [
    'EPSANetWithFPN', 'epsanet_fpn_backbone', 'fasterrcnn_epsanet_fpn', 'maskrcnn_epsanet_fpn',
    'retinanet_epsanet_fpn',
]

# Parameter-name prefixes of the backbone from its last stage to its stem, as torchvision counts
# trainable layers (5 = all, 0 = none).
_LAYERS_FROM_LAST = ('layer4', 'layer3', 'layer2', 'layer1', 'conv1')
FPN_CHANNELS = 256


class _BackboneArgs(NamedTuple):
    """The name of the function the user called and its names for the backbone's arguments, for messages."""
    where: str
    pretrained: str
    trainable_layers: str
    timm_kwargs: str


# What the builders give timm.create_model themselves (a user's value would reach it twice), and
# what to do instead.
_SET_BY_BUILDER = {
    'pretrained': 'pass {pretrained}=True instead',
    'features_only': 'leave it out, the backbone returns features',
    'out_indices': 'leave it out, the FPN takes stages {stages}',
}


class EPSANetWithFPN(nn.Module):
    """An FPN on the stage outputs of a timm ``features_only`` EPSANet: torchvision's
    ``BackboneWithFPN`` for a body that returns a list of feature maps.

    Returns an ordered dict of ``out_channels``-channel maps, ``'0'``, ``'1'``, ... from the finest
    stage to the coarsest, then what ``extra_blocks`` adds (``'pool'``, or ``'p6'`` and ``'p7'``).
    """

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS, extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
        )
        self.out_channels = out_channels  # what torchvision's detectors read

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(self.body(x))))


def epsanet_fpn_backbone(
        model_name: str = 'epsanet50',
        pretrained: bool = False,
        trainable_layers: Optional[int] = None,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        extra_blocks: Optional[ExtraFPNBlock] = None,
        frozen_bn: Optional[bool] = None,
        out_channels: int = FPN_CHANNELS,
        **kwargs: Any,
) -> EPSANetWithFPN:
    """An EPSANet variant with an FPN on top, as torchvision's ``resnet_fpn_backbone``.

    Args:
        model_name: An EPSANet variant (``epsanet50``, ``epsanet101``, ``epsanet50_large``, ...).
        pretrained: Load ImageNet weights through ``timm.create_model(..., pretrained=True)``.
        trainable_layers: Trainable stages counted from the last: 0 (all frozen) to 5 (stem too).
            Default 3 for a pretrained backbone, else 5.
        returned_layers: Stages (1-4, strides 4-32) whose outputs feed the FPN.
        extra_blocks: Extra FPN levels; default ``LastLevelMaxPool`` (a max-pooled ``'pool'`` level).
        frozen_bn: Replace every BatchNorm by a frozen one. Default: when ``pretrained``.
        out_channels: Channels of every FPN level.
        **kwargs: Passed to ``timm.create_model`` (``layers``, ``drop_path_rate``,
            ``pretrained_cfg_overlay``, ``output_stride``, ...).
    """
    where = 'epsanet_fpn_backbone'
    out_channels = whole_number(out_channels, 'out_channels', where)
    body = _backbone_body(
        _BackboneArgs(where, 'pretrained', 'trainable_layers', '**kwargs'),
        model_name, pretrained, trainable_layers, returned_layers, frozen_bn, kwargs)
    return EPSANetWithFPN(body, out_channels, extra_blocks)


def _backbone_body(
        names: _BackboneArgs,
        model_name: str,
        pretrained: bool,
        trainable_layers: Optional[int],
        returned_layers: Sequence[int],
        frozen_bn: Optional[bool],
        timm_kwargs: Any,
) -> nn.Module:
    """The timm ``features_only`` EPSANet, its BatchNorm frozen and its first layers fixed as asked,
    every argument checked first (``names`` says what the user called them)."""
    where = names.where
    check_model_name(model_name)
    pretrained = flag(pretrained, names.pretrained, where)
    all_layers = len(_LAYERS_FROM_LAST)
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else all_layers
    trainable_layers = whole_number(trainable_layers, names.trainable_layers, where, minimum=0, maximum=all_layers)
    stages = whole_numbers(returned_layers, 'returned_layers', where, each='distinct stages (strides 4 to 32)',
                           maximum=4)
    if len(set(stages)) != len(stages):
        raise ValueError(f'{where}: returned_layers={stages} names a stage twice; pass distinct stages among 1 to 4.')
    frozen_bn = flag(frozen_bn, 'frozen_bn', where, optional=True)
    if frozen_bn is None:
        frozen_bn = pretrained
    if not isinstance(timm_kwargs, Mapping):
        raise TypeError(
            f'{where}: {names.timm_kwargs}={timm_kwargs!r} is not a dict; pass a dict of timm.create_model arguments.')
    for key, instead in _SET_BY_BUILDER.items():
        if key in timm_kwargs:
            raise TypeError(
                f'{where}: {names.timm_kwargs} sets {key}, which {where} passes to timm.create_model itself; '
                + instead.format(pretrained=names.pretrained, stages=stages) + '.')

    body = timm.create_model(
        model_name, pretrained=pretrained, features_only=True, out_indices=tuple(sorted(stages)), **timm_kwargs)
    if frozen_bn:
        body = freeze_batch_norm_2d(body)
    layers_to_train = _LAYERS_FROM_LAST[:trainable_layers]
    if trainable_layers == all_layers:
        layers_to_train += ('bn1',)  # the stem's norm trains with its conv, as in torchvision
    for name, parameter in body.named_parameters():
        if not name.startswith(layers_to_train):
            parameter.requires_grad_(False)
    return body


def _detector(
        detector: Type[nn.Module],
        where: str,
        model_name: str,
        num_classes: Optional[int],
        pretrained_backbone: bool,
        trainable_backbone_layers: Optional[int],
        frozen_bn: Optional[bool],
        backbone_kwargs: Optional[Dict[str, Any]],
        returned_layers: Sequence[int],
        extra_blocks: Callable[[nn.Module], ExtraFPNBlock],
        kwargs: Dict[str, Any],
) -> nn.Module:
    """``detector`` on an EPSANet-FPN backbone, normalising images with the backbone's own mean and std
    (ImageNet's unless its weights say otherwise); ``extra_blocks`` makes the FPN's extra levels for the body."""
    if num_classes is not None:  # None: torchvision's rule, a box_predictor of the user's own in kwargs
        # an R-CNN counts the background as a class: one class would detect nothing
        minimum = 1 if detector is RetinaNet else 2
        num_classes = whole_number(num_classes, 'num_classes', where, minimum=minimum)
    body = _backbone_body(
        _BackboneArgs(where, 'pretrained_backbone', 'trainable_backbone_layers', 'backbone_kwargs'),
        model_name, pretrained_backbone, trainable_backbone_layers, returned_layers, frozen_bn,
        {} if backbone_kwargs is None else backbone_kwargs)
    backbone = EPSANetWithFPN(body, FPN_CHANNELS, extra_blocks(body))
    cfg = body.pretrained_cfg
    return detector(
        backbone, num_classes=num_classes, **{'image_mean': list(cfg['mean']), 'image_std': list(cfg['std']), **kwargs})


def fasterrcnn_epsanet_fpn(
        model_name: str = 'epsanet50',
        num_classes: Optional[int] = 91,
        pretrained_backbone: bool = False,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN with an EPSANet-FPN backbone (stages 1-4 and a max-pooled P6).

    Args:
        model_name: An EPSANet variant.
        num_classes: Classes including the background (91 for COCO's category ids, as torchvision),
            at least 2; None with a ``box_predictor`` of your own in ``kwargs``.
        pretrained_backbone: ImageNet weights for the backbone through timm.
        trainable_backbone_layers: 0-5, see :func:`epsanet_fpn_backbone`.
        frozen_bn: Frozen BatchNorm in the backbone; default: when ``pretrained_backbone``.
        backbone_kwargs: Passed to ``timm.create_model``.
        **kwargs: Passed to torchvision's ``FasterRCNN`` (``min_size``, ``max_size``, ...).
    """
    return _detector(FasterRCNN, 'fasterrcnn_epsanet_fpn', model_name, num_classes, pretrained_backbone,
                     trainable_backbone_layers, frozen_bn, backbone_kwargs, (1, 2, 3, 4), _max_pool, kwargs)


def maskrcnn_epsanet_fpn(
        model_name: str = 'epsanet50',
        num_classes: Optional[int] = 91,
        pretrained_backbone: bool = False,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN with an EPSANet-FPN backbone (stages 1-4 and a max-pooled P6).

    Arguments as :func:`fasterrcnn_epsanet_fpn`; ``kwargs`` go to torchvision's ``MaskRCNN``.
    """
    return _detector(MaskRCNN, 'maskrcnn_epsanet_fpn', model_name, num_classes, pretrained_backbone,
                     trainable_backbone_layers, frozen_bn, backbone_kwargs, (1, 2, 3, 4), _max_pool, kwargs)


def retinanet_epsanet_fpn(
        model_name: str = 'epsanet50',
        num_classes: Optional[int] = 91,
        pretrained_backbone: bool = False,
        trainable_backbone_layers: Optional[int] = None,
        frozen_bn: Optional[bool] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
) -> RetinaNet:
    """RetinaNet with an EPSANet-FPN backbone: P3-P5 from stages 2-4, P6 and P7 by stride-2
    convolutions starting from C5.

    Arguments as :func:`fasterrcnn_epsanet_fpn` (``num_classes`` at least 1: RetinaNet has no
    background class); ``kwargs`` go to torchvision's ``RetinaNet``.
    """
    return _detector(RetinaNet, 'retinanet_epsanet_fpn', model_name, num_classes, pretrained_backbone,
                     trainable_backbone_layers, frozen_bn, backbone_kwargs, (2, 3, 4), _p6_p7, kwargs)


def _max_pool(body: nn.Module) -> ExtraFPNBlock:
    return LastLevelMaxPool()


def _p6_p7(body: nn.Module) -> ExtraFPNBlock:
    return LastLevelP6P7(body.feature_info.channels()[-1], FPN_CHANNELS)
