"""The model after the base stage: where it runs (`hardware`), loading it quantized for training or
in full (`load`), its LoRA adapters (`lora`), int4 quantization-aware training (`qat`)."""
