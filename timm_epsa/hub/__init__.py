"""EPSANet weights and the Hugging Face Hub: ``pretrained=True`` loading (:mod:`.pretrained`, with
:mod:`.download` and :mod:`.repos`), checkpoints turned into Hub folders (:mod:`.checkpoint`,
:mod:`.convert`, :mod:`.folder`, :mod:`.config_json`, :mod:`.cards`), and publishing them
(:mod:`.publish`)."""
from .pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, PretrainedWeightsError, cached_weights, install

__all__ = ['CARD_NAME', 'CONFIG_NAME', 'PretrainedWeightsError', 'WEIGHTS_NAME', 'cached_weights', 'install']
