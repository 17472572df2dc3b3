"""Model code (Llama/SmolLM2, Qwen3, Qwen3-MoE), attention, checkpoint loading, tokenizers.

Import the submodules directly (`orbit.models.transformer`, `orbit.models.loader`, ...);
this package file imports nothing so that `import orbit.models.config` stays cheap.
"""
