"""Detectors on an EPSANet-FPN backbone (timm_epsa.detection) against torchvision's ResNet-50 ones:
a training step and eval boxes for each, freezing as torchvision freezes, and the Hub route for
pretrained weights."""
import pytest
import safetensors.torch
import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from naive_epsanet import randomize_batchnorm_
from timm_epsa.detection import (
    epsanet_fpn_backbone, fasterrcnn_epsanet_fpn, maskrcnn_epsanet_fpn, retinanet_epsanet_fpn)
from timm_epsa.hub import PretrainedWeightsError

pytest_plugins = ['hub_stub']  # fixtures: hub, single_thread
pytestmark = pytest.mark.usefixtures('single_thread')

TINY = dict(layers=(1, 1, 1, 1))
SIZE = 128
NUM_CLASSES = 3
SMALL_IMAGES = dict(min_size=SIZE, max_size=SIZE)
# torchvision's options, for speed: fewer proposals and sampled RoIs; and no score threshold, so
# that an untrained detector still returns boxes to check (the ten best).
R_CNN = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=200,
             rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_score_thresh=0.0, box_detections_per_img=10)
DETECTOR_KWARGS = {
    fasterrcnn_epsanet_fpn: R_CNN,
    maskrcnn_epsanet_fpn: R_CNN,
    retinanet_epsanet_fpn: dict(score_thresh=0.0, detections_per_img=10),
}
LOSSES = {
    fasterrcnn_epsanet_fpn: {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'},
    maskrcnn_epsanet_fpn: {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg', 'loss_mask'},
    retinanet_epsanet_fpn: {'classification', 'bbox_regression'},
}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """(file, state dict): "ImageNet" weights for the tiny EPSANet-50, with non-trivial BatchNorm."""
    torch.manual_seed(0)
    model = timm.create_model('epsanet50', **TINY)
    randomize_batchnorm_(model)
    path = tmp_path_factory.mktemp('weights') / 'model.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    return path, model.state_dict()


def _image_and_target():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10., 20., 60., 90.], [70., 30., 120., 100.]])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    target = dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)
    return torch.rand(3, SIZE, SIZE, generator=gen), target


def _body_norms(model):
    return [m for m in model.backbone.body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize('build', [fasterrcnn_epsanet_fpn, maskrcnn_epsanet_fpn, retinanet_epsanet_fpn])
def test_detector_with_pretrained_backbone_trains_a_step_and_detects(build, weights):
    """Pretrained backbone, defaults: BatchNorm frozen, stem and stage 1 fixed, stages 2-4 trained."""
    path, state_dict = weights
    torch.manual_seed(0)
    # weights that come with their own normalisation, which the detector must apply to its images
    overlay = dict(file=str(path), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    model = build(
        num_classes=NUM_CLASSES, pretrained_backbone=True, backbone_kwargs=dict(TINY, pretrained_cfg_overlay=overlay),
        **SMALL_IMAGES, **DETECTOR_KWARGS[build])
    assert (model.transform.image_mean, model.transform.image_std) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv2.conv_4.weight, state_dict['layer3.0.conv2.conv_4.weight'])
    norms = _body_norms(model)
    assert norms and all(isinstance(norm, FrozenBatchNorm2d) for norm in norms)
    norm_stats = [(norm.running_mean.clone(), norm.running_var.clone(), norm.weight.clone()) for norm in norms]
    assert torch.equal(norms[0].running_mean, state_dict['bn1.running_mean'])

    image, target = _image_and_target()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model([image], [target])
    assert set(losses) == LOSSES[build]
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    for name, parameter in body.named_parameters():
        if name.startswith(('layer2', 'layer3', 'layer4')):
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert all(p.grad is not None for p in model.backbone.fpn.parameters())
    optimizer.step()
    for norm, (mean, var, weight) in zip(norms, norm_stats):
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
        assert torch.equal(norm.weight, weight)

    model.eval()
    with torch.no_grad():
        detections, = model([image])
    boxes = detections['boxes']
    assert boxes.shape == (10, 4)
    assert (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    first_label = 0 if build is retinanet_epsanet_fpn else 1  # R-CNNs keep 0 for the background
    assert detections['labels'].min() >= first_label and detections['labels'].max() < NUM_CLASSES
    assert ((detections['scores'] >= 0) & (detections['scores'] <= 1)).all()
    if build is maskrcnn_epsanet_fpn:
        assert detections['masks'].shape == (len(boxes), 1, SIZE, SIZE)


def test_backbone_from_scratch_trains_everything_with_batchnorm():
    """Without pretrained weights nothing is frozen: BatchNorm learns its statistics, every layer trains."""
    torch.manual_seed(0)
    backbone = epsanet_fpn_backbone(**TINY).train()
    assert all(p.requires_grad for p in backbone.parameters())
    norms = [m for m in backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules())
    before = norms[-1].running_mean.clone()
    features = backbone(torch.randn(2, 3, SIZE, SIZE))
    assert not torch.equal(norms[-1].running_mean, before)
    # stage outputs at strides 4 to 32 and the max-pooled level, every one with the FPN's 256 channels
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        '0': (2, 256, 32, 32), '1': (2, 256, 16, 16), '2': (2, 256, 8, 8), '3': (2, 256, 4, 4), 'pool': (2, 256, 2, 2)}


@pytest.mark.parametrize('trainable_layers', range(6))
def test_trainable_layers_freeze_what_torchvision_freezes(trainable_layers):
    def trainable(body):
        return {name.split('.')[0]: p.requires_grad for name, p in body.named_parameters()}

    ours = epsanet_fpn_backbone(trainable_layers=trainable_layers, device='meta', **TINY)
    with torch.device('meta'):
        reference = resnet_fpn_backbone(
            backbone_name='resnet50', weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=trainable_layers)
    assert trainable(ours.body) == trainable(reference.body)


def _reference(build):
    """torchvision's ResNet-50 detector with the neck the paper's setup uses."""
    if build is retinanet_epsanet_fpn:
        backbone = resnet_fpn_backbone(
            backbone_name='resnet50', weights=None, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(2048, 256))
        return RetinaNet(backbone, num_classes=80)
    detector = FasterRCNN if build is fasterrcnn_epsanet_fpn else MaskRCNN
    return detector(resnet_fpn_backbone(backbone_name='resnet50', weights=None), num_classes=81)


@pytest.mark.parametrize('build', [fasterrcnn_epsanet_fpn, maskrcnn_epsanet_fpn, retinanet_epsanet_fpn])
def test_neck_and_heads_are_torchvisions_for_resnet50(build):
    """Only the backbone differs: FPN (256 channels, the same levels) and heads have the same shapes."""
    def shapes(model):
        return {name: tuple(p.shape) for name, p in model.named_parameters() if not name.startswith('backbone.body.')}

    num_classes = 80 if build is retinanet_epsanet_fpn else 81
    with torch.device('meta'):
        ours, reference = build(num_classes=num_classes), _reference(build)
    assert shapes(ours) == shapes(reference)


def test_pretrained_backbone_comes_through_timms_hub_route(hub, weights):
    """As timm.create_model(pretrained=True): refused where nothing is published, loaded from a Hub repo
    named in pretrained_cfg_overlay (served by the loopback Hub)."""
    with pytest.raises(PretrainedWeightsError, match=r'No pretrained weights are published for epsanet50\.in1k'):
        retinanet_epsanet_fpn(pretrained_backbone=True, backbone_kwargs=TINY)

    path, state_dict = weights
    hub.serve('lab/epsanet50.tiny', path.parent)
    model = retinanet_epsanet_fpn(
        pretrained_backbone=True, backbone_kwargs=dict(TINY, pretrained_cfg_overlay=dict(hf_hub_id='lab/epsanet50.tiny')))
    assert torch.equal(model.backbone.body.layer4[0].conv2.conv_1.weight, state_dict['layer4.0.conv2.conv_1.weight'])
    assert ('GET', '/lab/epsanet50.tiny/resolve/main/model.safetensors') in hub.requests


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(model_name='resnet50'), ValueError, r"unknown model 'resnet50'; choose from epsanet50, epsanet101"),
    (dict(model_name='epsanet50.coco'), ValueError, r"epsanet50 has no tag 'coco'; its tags: epsanet50.in1k"),
    (dict(trainable_layers=6), ValueError,
     r'epsanet_fpn_backbone: trainable_layers=6 is out of range; pass an int from 0 to 5'),
    (dict(trainable_layers=-1), ValueError, r'trainable_layers=-1 is out of range'),
    (dict(returned_layers=(0, 4)), ValueError,
     r'returned_layers=\(0, 4\) is out of range; pass ints from 1 to 4, distinct stages'),
    (dict(returned_layers=()), ValueError, r'returned_layers=\(\) is empty'),
    (dict(returned_layers=(2, 2)), ValueError, r'returned_layers=\(2, 2\) names a stage twice'),
    (dict(out_channels=0), ValueError, r'out_channels=0 is out of range; pass an int of at least 1'),
    # values of the wrong kind: each used to fail with a raw AttributeError or TypeError, or be taken for another
    (dict(model_name=None), TypeError, r'model_name=None is not a model name; choose from epsanet50'),
    (dict(trainable_layers=2.5), TypeError, r'trainable_layers=2\.5 is not a whole number; pass an int from 0 to 5'),
    (dict(trainable_layers='3'), TypeError, r"trainable_layers='3' is not a whole number"),
    (dict(trainable_layers=True), TypeError, r'trainable_layers=True is not a whole number'),
    (dict(returned_layers=4), TypeError, r'returned_layers=4 is not a list or tuple of whole numbers'),
    (dict(pretrained='no'), TypeError, r"pretrained='no' is not a flag; pass True or False"),
    (dict(frozen_bn='no'), TypeError, r"frozen_bn='no' is not a flag; pass True, False or None"),
    (dict(out_indices=(1,)), TypeError,
     r'\*\*kwargs sets out_indices, which epsanet_fpn_backbone passes to timm.create_model itself; leave it out'),
])
def test_bad_backbone_arguments_are_refused_in_one_line(kwargs, error, message):
    with pytest.raises(error, match=message):
        epsanet_fpn_backbone(**kwargs)


@pytest.mark.parametrize('build, kwargs, error, message', [
    (fasterrcnn_epsanet_fpn, dict(num_classes=0), ValueError,
     r'fasterrcnn_epsanet_fpn: num_classes=0 is out of range; pass an int of at least 2'),
    (maskrcnn_epsanet_fpn, dict(num_classes=1), ValueError,
     r'num_classes=1 is out of range; pass an int of at least 2'),
    (retinanet_epsanet_fpn, dict(num_classes=0), ValueError,
     r'retinanet_epsanet_fpn: num_classes=0 is out of range; pass an int of at least 1'),
    (fasterrcnn_epsanet_fpn, dict(num_classes=2.5), TypeError, r'num_classes=2\.5 is not a whole number'),
    (fasterrcnn_epsanet_fpn, dict(model_name=None), TypeError, r'model_name=None is not a model name'),
    (retinanet_epsanet_fpn, dict(trainable_backbone_layers='3'), TypeError,
     r"retinanet_epsanet_fpn: trainable_backbone_layers='3' is not a whole number; pass an int from 0 to 5"),
    (maskrcnn_epsanet_fpn, dict(pretrained_backbone='no'), TypeError, r"pretrained_backbone='no' is not a flag"),
    (fasterrcnn_epsanet_fpn, dict(backbone_kwargs=3), TypeError,
     r'backbone_kwargs=3 is not a dict; pass a dict of timm\.create_model arguments'),
    (fasterrcnn_epsanet_fpn, dict(backbone_kwargs=dict(pretrained=True)), TypeError,
     r'backbone_kwargs sets pretrained, which fasterrcnn_epsanet_fpn passes to timm.create_model itself; pass '
     r'pretrained_backbone=True instead'),
    (retinanet_epsanet_fpn, dict(backbone_kwargs=dict(features_only=False)), TypeError,
     r'backbone_kwargs sets features_only, .* leave it out'),
])
def test_bad_detector_arguments_are_refused_in_one_line(build, kwargs, error, message):
    """Before anything is built: `num_classes=0` used to build a detector that classifies nothing."""
    with pytest.raises(error, match=message):
        build(**{'backbone_kwargs': dict(TINY, device='meta'), **kwargs})


def test_a_box_predictor_of_ones_own_takes_num_classes_none():
    """As in torchvision: num_classes=None is how a detector takes a predictor of the user's own."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    predictor = FastRCNNPredictor(1024, 5)
    model = fasterrcnn_epsanet_fpn(num_classes=None, box_predictor=predictor, backbone_kwargs=TINY)
    assert model.roi_heads.box_predictor is predictor
