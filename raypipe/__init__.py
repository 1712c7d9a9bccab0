"""raypipe: raw multimodal files to fused, missing-robust predictions on Ray."""
__version__ = "0.1.0"
