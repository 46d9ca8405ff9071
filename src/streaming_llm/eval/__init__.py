"""Evaluation: perplexity, the paper's reproductions, attention maps, plots, the offline corpus."""
