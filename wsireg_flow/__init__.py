"""wsireg-flow: out-of-core registration of gigapixel whole-slide histology images."""

__version__ = "0.1.0"
