"""finetune: Hydra-configured parameter-efficient fine-tuning of causal language models."""

import logging as _logging

__version__ = "0.1.0"


class _NoKernelsAdvice(_logging.Filter):
    """bitsandbytes, imported (through transformers / PEFT) by every command, warns on CPUs with AVX-512 BF16 that
    the optional `kernels` package (which fetches its kernel from the Hugging Face hub) is missing, and advises
    installing it; its own fallback is what runs. That one advice is dropped, nothing else from bitsandbytes."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsAdvice())
