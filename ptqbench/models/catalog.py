"""Catalog of built-in models (filled by the diffusion-side work)."""
