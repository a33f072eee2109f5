"""The corpus pipeline: clean, deduplicate, tokenize and describe pretraining text (`lmforge data ...`)."""
