"""What the machine and its network offer a run: the CPU's instruction sets (:mod:`.cpu`: whether bf16 is fast) and
whether the Hugging Face hub answers (:mod:`.hub`)."""
