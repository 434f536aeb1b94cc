"""Command-line entrypoints: finetune-train, -eval, -chat, -bench, -bench-qat, and the override pre-check."""
