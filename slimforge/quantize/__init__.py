"""Quantization: bitsandbytes, GPTQ, GGUF export.

This module only declares registry entries; implementations load on first use.
"""
