"""The model: loading (precision, bitsandbytes backends, the embedded SmolLM2), the architecture table
with its QAT groups, LoRA, and the label-position loss."""
