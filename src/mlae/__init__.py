"""mlae: Masked LoRA Experts and friends for parameter-efficient fine-tuning of vision transformers.

    import mlae
    mlae.apply(model, mlae.MLAEConfig(experts=8, dropout=0.5))   # adapts attn.qkv by default
    mlae.merge(model); mlae.save_adapter(model, "task.safetensors")
"""
from .adapters import AdapterConfig, AdapterLayer, DMLoRAConfig, LoRAConfig, MLAEConfig, MoLEConfig, config_from_dict
from .adapters.mole import arithmetic_merge, from_adapters as mole_from_adapters, select_experts
from .errors import MLAEError, MLAEWarning
from .inject import (adapter_layers, apply, aux_losses, backbone_fingerprint, count_parameters, freeze_backbone,
                     learned_values, merge, merge_and_unload, set_progress, set_train_size, unmerge)
from .io import (export_peft, load_adapter, read_adapter_config, read_adapter_learned, read_adapter_metadata,
                 save_adapter)
from .similarity import expert_similarity, similarity_matrix

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "AdapterLayer", "LoRAConfig", "MLAEConfig", "DMLoRAConfig", "MoLEConfig",
           "mole_from_adapters", "select_experts", "arithmetic_merge", "config_from_dict", "apply", "merge",
           "unmerge", "merge_and_unload", "backbone_fingerprint", "adapter_layers", "freeze_backbone",
           "count_parameters", "set_progress", "aux_losses", "set_train_size", "learned_values", "save_adapter",
           "load_adapter", "read_adapter_metadata", "read_adapter_config", "read_adapter_learned", "export_peft",
           "expert_similarity", "similarity_matrix", "MLAEError", "MLAEWarning"]
