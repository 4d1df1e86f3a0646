"""SmartPath training: data, synthetic pathology, rewards and metrics, SFT and GRPO."""
