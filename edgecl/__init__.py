"""edgecl: continual learning on edge devices with MI-guided sparse tuning (MIST)."""

__version__ = "0.1.0"
