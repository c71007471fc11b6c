"""tenantlora's vLLM plugin for faster multi-LoRA on the CPU (see plugin.py for what it patches,
ops.py for the grouped ops and their shapes)."""
