"""Ember backends: reference (the oracle), cpu, cuda, mobile."""
