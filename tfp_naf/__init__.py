"""Neural autoregressive flows (Huang et al., 2018) as TensorFlow Probability bijectors."""

from tfp_naf.conditioners import CompactAutoregressiveNetwork
from tfp_naf.flow import NeuralAutoregressiveFlow
from tfp_naf.transformers import DeepDenseSigmoidalFlow, DeepSigmoidalFlow

__all__ = [
    "CompactAutoregressiveNetwork",
    "DeepDenseSigmoidalFlow",
    "DeepSigmoidalFlow",
    "NeuralAutoregressiveFlow",
]
__version__ = "0.1.0"
from tfp_naf.keras import NAFDensityModel as NAFDensityModel  # noqa: E402
from tfp_naf.keras import export_saved_model as export_saved_model  # noqa: E402
from tfp_naf.keras import make_flow as make_flow  # noqa: E402
