"""Loading models: local directories, GGUF files (the embedded SmolLM2), hub ids and the
random-weight shape presets. Imports only the shared types."""
