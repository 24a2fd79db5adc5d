"""Evaluation: answering and scoring a LLaVA-format test set (`evaluate`), the per-family metrics
(`metrics`), and linear probes of what the image tokens and the LLM's layers carry (`probe`)."""
