from megatron_sharpness.backends.base import ProbeBackend

__all__ = ["ProbeBackend"]
