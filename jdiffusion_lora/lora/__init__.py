"""LoRA-family adapters (LoRA/LoCon, LoHa, LoKr, DoRA) and every common LoRA file format.

Layers and injection work on any jt.nn.Module tree (`layers.py`, `inject.py`); files go through one
format-independent `LoraState` (`state.py`; read by `formats.py`, written by `writing.py`); the adapter math (each kind's weight update) is
`adapter_math.py`; `LoraLoaderMixin` gives a pipeline diffusers' method names (`loader.py`).
"""
from .adapter_math import LoraError
from .formats import (detect_format, kohya_name_table, load_lora_state, parse_lora_state_dict, read_lora_file,
                      standard_module_names)
from .inject import (PRESETS, active_adapters, adapted_layers, delete_adapter, enable_adapters, find_target_modules,
                    fuse, get_adapter_weights, inject_adapter, list_adapters, load_adapter_weights, lora_parameters,
                    named_lora_parameters, set_adapters, unfuse, unload)
from .layers import Adapter, AdapterConfig, LoraLayer
from .loader import LoraLoaderMixin, merge_lora_into_folder
from .state import LoraState, ModuleLora
from .writing import convert_lora_file, guess_base_model, save_lora_state, to_diffusers, to_kohya

__all__ = [
    "AdapterConfig", "Adapter", "LoraLayer", "LoraError", "LoraState", "ModuleLora", "PRESETS",
    "inject_adapter", "find_target_modules", "load_adapter_weights", "get_adapter_weights",
    "lora_parameters", "named_lora_parameters", "adapted_layers", "list_adapters", "active_adapters",
    "set_adapters", "enable_adapters", "fuse", "unfuse", "unload", "delete_adapter",
    "detect_format", "parse_lora_state_dict", "load_lora_state", "read_lora_file", "save_lora_state",
    "to_diffusers", "to_kohya", "convert_lora_file", "kohya_name_table", "standard_module_names",
    "guess_base_model", "LoraLoaderMixin", "merge_lora_into_folder",
]
