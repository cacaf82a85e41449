"""Loading models: local directories, GGUF files (the embedded SmolLM2), hub ids and the
random-weight shape presets, and their quantized weights. Imports only the shared types."""
