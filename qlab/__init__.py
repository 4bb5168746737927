"""qlab: neural-network quantization, taught and tested."""

__version__ = "0.1.0"
