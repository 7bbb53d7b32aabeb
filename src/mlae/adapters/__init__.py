"""The adapter methods: their configs and layers. ``mlae.inject`` and ``mlae.io`` import this package, so nothing in
it imports them; MoLE's model-level functions, which need both, are in ``mlae.adapters.mole``, which this package does
not import."""
from .base import CONFIGS, AdapterConfig, AdapterLayer, config_from_dict
from .lora import LoRAConfig, LoRALinear
from .mlae import MLAEConfig, MLAELinear
from .dmlora import DMLoRAConfig, DMLoRALinear
from .mole_layer import MoLEConfig, MoLELinear

__all__ = ["CONFIGS", "AdapterConfig", "AdapterLayer", "config_from_dict", "LoRAConfig", "LoRALinear",
           "MLAEConfig", "MLAELinear", "DMLoRAConfig", "DMLoRALinear", "MoLEConfig", "MoLELinear"]
