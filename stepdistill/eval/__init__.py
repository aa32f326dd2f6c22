"""Evaluation: quality metrics (toy prompt accuracy and toy-FID, Inception FID, CLIP score) and `stepdistill eval`'s
quality-vs-steps tables for a teacher and any LoRA students."""
