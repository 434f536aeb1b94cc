"""Taking a finished run further: LoRA merge (finetune-merge) and the INT8 ONNX export (finetune-export)."""
