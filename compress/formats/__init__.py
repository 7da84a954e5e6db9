"""Packed weight formats. Each module holds one family: pack, unpack, dequantize; gguf_file checks
GGUF files' bytes before any reader sees them."""
