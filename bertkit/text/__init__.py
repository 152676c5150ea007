"""Text to token ids: the tokenizers and their vocabularies, corpora on disk, and the
workers that turn text into a token-id file."""
