"""What the machine and its network offer a run: the CPU's instruction sets (:mod:`.cpu`: whether bf16 is fast),
whether the Hugging Face hub answers (:mod:`.hub`) and whether ``torch.compile`` can build kernels (:mod:`.compiler`)."""
