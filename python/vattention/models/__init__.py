"""Real-model helpers (optional ``models`` extra): offline SmolLM2 loading and attention capture."""
