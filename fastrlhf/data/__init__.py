"""fastrlhf.data: local tokenizers, SFT features with label masking, collators, validated dataset readers."""
from .tokenizer import DEFAULT_CHAT_TEMPLATE, build_test_tokenizer, build_word_tokenizer

__all__ = ["DEFAULT_CHAT_TEMPLATE", "build_word_tokenizer", "build_test_tokenizer"]
