"""Real-model helpers (optional ``models`` extra): offline SmolLM2-135M and Gemma-3-270M
(``gemma3`` extra) loading and capture of their real decode attention."""
