"""Prompt-tuning defenses. Each tunes a few parameters on a frozen CLIP from clean few-shot images."""
