"""After the merge: post-training quantization (`quantize`), GGUF files for llama.cpp (`gguf`), and
running a GGUF in-process (`llamacpp`)."""
