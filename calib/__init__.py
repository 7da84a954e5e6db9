"""Calibration: text windows, the sequential block runner, statistics accumulators."""
