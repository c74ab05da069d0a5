"""Catalog of built-in metrics (filled by the metrics work)."""
