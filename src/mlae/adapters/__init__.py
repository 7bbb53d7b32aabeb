from .base import CONFIGS, AdapterConfig, AdapterLayer, config_from_dict
from .lora import LoRAConfig, LoRALinear
from .mlae import MLAEConfig, MLAELinear

__all__ = ["CONFIGS", "AdapterConfig", "AdapterLayer", "config_from_dict", "LoRAConfig", "LoRALinear",
           "MLAEConfig", "MLAELinear"]
