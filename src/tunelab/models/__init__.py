"""Model loading: local HF directories, hub ids, GGUF files and embedded aliases; tiny test models."""
