"""Audio labelling (ASR and cry detection) with Qwen-Audio models, stored in Postgres."""

__version__ = "0.1.0"
