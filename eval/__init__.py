"""Perplexity on a fixed protocol, and the side-by-side comparison of post-pass methods."""
