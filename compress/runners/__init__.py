"""Runners: how a compression step walks the model."""
