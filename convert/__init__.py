"""Converters between Hugging Face folders and our layer-sharded layout."""
