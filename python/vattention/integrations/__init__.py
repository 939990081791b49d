"""Integrations of vattention with model libraries.

- ``vattention.integrations.transformers``: ``attn_implementation="vattention"`` for
  Hugging Face transformers models whose attention goes through ``AttentionInterface``
  (the Llama family: Llama, SmolLM2, Mistral, Qwen2, ...). Importing that module
  registers the implementation; it needs the ``models`` extra.

Importing this package itself imports nothing optional.
"""
