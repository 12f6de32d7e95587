"""Exports of pruned models for the engines users serve with.

* :func:`seap.export.to_gguf.export_gguf`: a GGUF file for an unmodified llama.cpp (any per-layer widths);
* :func:`seap.export.to_transformers.export_transformers`: a folder stock ``transformers`` loads
  (one width for all layers).
"""
