"""Evaluation metrics: Frechet Audio Distance (`fad`, with an `evaluate` module in `fad/`) and audio embedders."""
