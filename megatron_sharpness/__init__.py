"""Critical sharpness λ_c = 2/η_c along the optimizer's own update, measured while training."""

from megatron_sharpness.config import ConfigError, SharpnessConfig
from megatron_sharpness.integrations.pytorch import TorchSharpnessProbe
from megatron_sharpness.measurement import Measurement, TaskMeasurement
from megatron_sharpness.probe import SharpnessProbe
from megatron_sharpness.search import SearchResult, critical_lr_search

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Measurement",
    "SearchResult",
    "SharpnessConfig",
    "SharpnessProbe",
    "TaskMeasurement",
    "TorchSharpnessProbe",
    "__version__",
    "critical_lr_search",
]
