"""clip-purify engine: backdoored CLIP models, prompt-tuning defenses, metrics."""
