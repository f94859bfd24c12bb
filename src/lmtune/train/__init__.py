"""Training the adapters: the loop with exact resume (`loop`), packed-attention and chunked-loss
kernels (`kernels`), several processes through accelerate (`distributed`)."""
