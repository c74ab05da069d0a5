"""placeholder module replaced by the methods work."""
