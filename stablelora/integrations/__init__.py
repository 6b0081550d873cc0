"""Stable-LoRA inside other training frameworks (transformers' ``Trainer``, TRL)."""
