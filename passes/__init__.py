"""Ember passes. Importing this package registers every pass (see passes/README.md)."""
