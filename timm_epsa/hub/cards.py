"""Model cards for the Hub: ``card_templates/model_card.md`` beside this module rendered for one variant.

One Jinja template serves the four variants; what differs between them (title, the paper's row,
whether it is a Large variant) is in ``card_templates/variants.json``, and what can be
measured (parameters, MACs, PSA layout) is measured. The repo's top-level ``hub_cards/`` holds the
four cards as rendered here. The YAML header is written by huggingface_hub's
``ModelCardData``, so its keys and its ``model-index`` are the ones the Hub reads.
"""
import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Dict, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..escaping import code_block
from ..models.measure import ModelFacts

__all__ = ['CardDataset', 'IMAGENET_1K', 'card_repo_id', 'check_accuracy', 'render_model_card', 'variant_info']

_CARDS = files('timm_epsa.hub') / 'card_templates'
_TITLE = '# Model card for '  # the template's first heading, followed by the repo id


@dataclass(frozen=True)
class CardDataset:
    """The data a card's weights were trained on and its accuracy measured on."""
    name: str  # as the card's text and its model-index name it
    id: str  # the model-index dataset type: a Hub dataset id where there is one
    split: str  # the split the accuracy is measured on
    on_hub: bool = True  # listed in the card's ``datasets`` (which the Hub links to its dataset pages)


IMAGENET_1K = CardDataset('ImageNet-1k', 'imagenet-1k', 'validation')


def variant_info() -> Dict[str, Dict[str, Any]]:
    """Title, the paper's ImageNet figures and the Large flag of every variant, by model name."""
    return json.loads((_CARDS / 'variants.json').read_text(encoding='utf-8'))


def check_accuracy(top1: Optional[float], top5: Optional[float]) -> None:
    """Refuse a top-5 accuracy below the top-1 of the same evaluation: every top-1 hit is a top-5 hit,
    so such a pair was mistyped or measured apart, and a card would publish it."""
    if top1 is not None and top5 is not None and top5 < top1:
        raise ValueError(f'top-5 accuracy {top5:g}% is below top-1 {top1:g}%, which it cannot be (every top-1 hit is '
                         f'a top-5 hit): give both of one evaluation')


def render_model_card(
        model_name: str,
        repo_id: str,
        facts: ModelFacts,
        pretrained_cfg: Mapping[str, Any],
        top1: Optional[float] = None,
        top5: Optional[float] = None,
        dataset: CardDataset = IMAGENET_1K,
        weights: Optional[str] = None,
        train_args: Optional[str] = None,
) -> str:
    """The README.md of ``repo_id`` holding ``model_name`` weights.

    Args:
        facts: measured parameters, MACs and PSA layout of ``model_name``.
        pretrained_cfg: the cfg the weights are published with (input size, crop, interpolation, classes).
        top1, top5: accuracy in percent on ``dataset``; they become the card's ``model-index``.
        weights: one line of Markdown on where the weights come from (checkpoint kind, epoch, EMA);
            whatever in it comes from outside must already be escaped (:mod:`timm_epsa.escaping`).
        train_args: the training command line the checkpoint records, shown as a code block.
    """
    check_accuracy(top1, top5)
    variants = variant_info()
    metrics = [(value, kind, name) for value, kind, name in (
        (top1, 'accuracy', 'Top-1 accuracy (%)'),
        (top5, 'top_5_accuracy', 'Top-5 accuracy (%)'),
    ) if value is not None]
    card_data = ModelCardData(
        library_name='timm',
        license='apache-2.0',
        tags=['image-classification', 'timm'],
        datasets=[dataset.id] if dataset.on_hub else None,
        pipeline_tag='image-classification',
        model_name=repo_id if metrics else None,
        eval_results=[
            EvalResult(
                task_type='image-classification',
                dataset_type=dataset.id,
                dataset_name=dataset.name,
                dataset_split=dataset.split,
                metric_type=kind,
                metric_name=name,
                metric_value=value,
            ) for value, kind, name in metrics
        ] or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=(_CARDS / 'model_card.md').read_text(encoding='utf-8'),
        model_name=model_name,
        repo_id=repo_id,
        variant=variants[model_name],
        variants=variants,
        depth=''.join(c for c in model_name if c.isdigit()),
        facts=facts,
        cfg=pretrained_cfg,
        top1=top1,
        top5=top5,
        dataset=dataset,
        weights=weights,
        train_args=train_args,
        code_block=code_block,
    )
    return str(card)


def card_repo_id(card: str) -> Optional[str]:
    """The repo id a rendered card was written for (its usage examples name it), None if not one of ours."""
    for line in card.splitlines():
        if line.startswith(_TITLE):
            return line[len(_TITLE):].strip()
    return None
