"""Reports: a sweep directory's runs collected into comparison tables and plots (finetune-report)."""
