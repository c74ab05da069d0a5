"""ptqbench: post-training quantization benchmark for diffusion transformers."""

from ptqbench.formats import get_format
from ptqbench.method import get_method

__version__ = "0.1.0"
__all__ = ["__version__", "get_format", "get_method"]
