"""`llmkit serve` and `llmkit monitor`: an OpenAI-compatible server with limits and metrics, and its monitor."""
