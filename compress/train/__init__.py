"""Training: the shared loop, fake-quantized layers, distillation losses."""
