"""Pruning: unstructured, N:M and structured (depth, width).

This module only declares registry entries; implementations load on first use.
"""
