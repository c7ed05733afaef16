"""ZEDA trainer: local data, tokenizer, teacher pretraining, evaluation and self-distillation."""
