"""fastrlhf.data: local tokenizers, SFT features with label masking, collators, validated dataset readers."""
from .collate import pad_batch
from .features import (
                       IGNORE_INDEX,
                       chat_sft_features,
                       check_messages,
                       preference_features,
                       prompt_features,
                       sft_features,
)
from .readers import DataError, read_rows, validate_rows
from .tokenizer import DEFAULT_CHAT_TEMPLATE, build_test_tokenizer, build_word_tokenizer

__all__ = [
    "DataError", "read_rows", "validate_rows",
    "sft_features", "chat_sft_features", "preference_features", "prompt_features", "check_messages",
    "IGNORE_INDEX",
    "pad_batch",
    "build_word_tokenizer", "build_test_tokenizer", "DEFAULT_CHAT_TEMPLATE",
]
