"""Evaluation: answering and scoring a LLaVA-format test set (`evaluate`), the per-family metrics
(`metrics`), linear probes of what the image tokens and the LLM's layers carry (`probe`), whether a picture lies
outside the model's training world (`world_check`), and text-only answers against the base LLM's (`text_only`)."""
