"""Tasks the toolkit generates itself: the addition demo, everyday-situation prompts, tiny random models."""
