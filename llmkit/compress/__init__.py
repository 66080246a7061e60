"""Making trained models smaller: pruning (llmkit.compress.prune)."""
