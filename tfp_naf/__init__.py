"""Neural autoregressive flows (Huang et al., 2018) as TensorFlow Probability bijectors."""

import os

# Quiet TensorFlow's C++ start-up logging unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfp_naf.conditioners import CompactAutoregressiveNetwork  # noqa: E402
from tfp_naf.flow import NeuralAutoregressiveFlow  # noqa: E402
from tfp_naf.keras import NAFDensityModel, export_saved_model, make_flow  # noqa: E402
from tfp_naf.transformers import DeepDenseSigmoidalFlow, DeepSigmoidalFlow  # noqa: E402

__all__ = [
    "CompactAutoregressiveNetwork",
    "DeepDenseSigmoidalFlow",
    "DeepSigmoidalFlow",
    "NAFDensityModel",
    "NeuralAutoregressiveFlow",
    "export_saved_model",
    "make_flow",
]
__version__ = "0.1.0"
