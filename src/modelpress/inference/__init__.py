"""Generation helpers: a quantized KV cache, sampling, plain and speculative decoding."""
