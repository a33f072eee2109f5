"""Training: the shared loop (loop.py) and the instruction-tuning stage (sft.py) with its data (sft_data.py),
LoRA (lora.py), P-Tuning v2 (ptuning.py) and adapter files (adapters.py)."""
