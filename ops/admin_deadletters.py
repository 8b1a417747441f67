"""Placeholder: filled in by the console work."""
