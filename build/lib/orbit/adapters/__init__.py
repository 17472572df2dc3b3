"""BF16 adapters (LoRA, OFT) on a frozen base, double-buffered for train/serve, PEFT in and out."""

from orbit.adapters.inject import AdapterConfig, AdapterSet, inject_adapters
from orbit.adapters.lora import LoRALinear
from orbit.adapters.oft import OFTLinear

__all__ = ["AdapterConfig", "AdapterSet", "LoRALinear", "OFTLinear", "inject_adapters"]
