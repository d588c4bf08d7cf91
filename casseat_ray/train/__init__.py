"""Student fine-tuning: collate, losses, the Ray Train loop, export."""
