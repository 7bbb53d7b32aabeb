from .base import CONFIGS, AdapterConfig, AdapterLayer, config_from_dict
from .lora import LoRAConfig, LoRALinear
from .mlae import MLAEConfig, MLAELinear
from .dmlora import DMLoRAConfig, DMLoRALinear
from .mole import MoLEConfig, MoLELinear

__all__ = ["CONFIGS", "AdapterConfig", "AdapterLayer", "config_from_dict", "LoRAConfig", "LoRALinear",
           "MLAEConfig", "MLAELinear", "DMLoRAConfig", "DMLoRALinear", "MoLEConfig", "MoLELinear"]
