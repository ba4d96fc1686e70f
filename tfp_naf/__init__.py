"""Neural autoregressive flows (Huang et al., 2018) as TensorFlow Probability bijectors.

The public names below are imported on first use (module `__getattr__`), so
`import tfp_naf` and `import tfp_naf.cli` do not import TensorFlow: the
command line answers `--help` and argument errors at once.
"""

import importlib
import os

# Quiet TensorFlow's C++ logging unless the user asked for it (their own value wins).
# Level 3 also hides the ERROR-level "failed call to cuInit" of machines without a GPU;
# TensorFlow's errors still reach Python as exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_PUBLIC = {
    "BoxSupport": "tfp_naf.support",
    "CompactAutoregressiveNetwork": "tfp_naf.conditioners",
    "DeepDenseSigmoidalFlow": "tfp_naf.transformers",
    "DeepSigmoidalFlow": "tfp_naf.transformers",
    "NAFDensityModel": "tfp_naf.keras",
    "NeuralAutoregressiveFlow": "tfp_naf.flow",
    "SharedDenseSigmoidalFlow": "tfp_naf.shared_mixing",
    "export_saved_model": "tfp_naf.export",
    "make_flow": "tfp_naf.keras",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tfp_naf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # Looked up once.
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
