"""Deployable files: formats behind one interface (compressed-tensors + PEFT adapter, GGUF for llama.cpp), parity, manifest, model card."""
