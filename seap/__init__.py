"""SEAP: Sparse Expert Activation Pruning for causal language models."""

__version__ = "0.1.0"
