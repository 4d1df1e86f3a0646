"""The SmartPath MLLM: Qwen2.5-VL base, slide aggregator, mixture of LoRA experts, router,
output grammar, and checkpoints (no training or distribution logic here)."""
