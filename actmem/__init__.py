"""actmem: activation-compressed training, side by side."""
__version__ = "0.1.0"
