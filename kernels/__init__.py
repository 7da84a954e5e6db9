"""Kernels for packed low-bit weights: Triton kernels and their pure-torch reference twins.

This package imports only torch, triton and numpy.
"""
