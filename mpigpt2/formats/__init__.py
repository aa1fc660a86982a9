"""File formats and data: llm.c model/shard files, Hugging Face, tokenizer, loader, checkpoints, atomic writes."""
