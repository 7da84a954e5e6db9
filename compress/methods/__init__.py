"""Compression methods: each observes statistics and solves per layer as pure functions."""
