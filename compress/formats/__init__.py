"""Packed weight formats. Each module holds one family: pack, unpack, dequantize."""
