"""Studies beside quantization: ``compare`` (the paper's table) and per-layer sensitivity."""
