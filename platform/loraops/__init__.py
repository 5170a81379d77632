"""loraops: tune, register and serve QLoRA adapters on Ray."""

__version__ = "0.1.0"
