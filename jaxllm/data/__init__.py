"""Data: tokenizer, document sources and the grain pretraining pipeline."""

from jaxllm.data.pipeline import counters, pretrain_dataset, shift_for_next_token
from jaxllm.data.sft import SFTStats, conversations, sft_dataset
from jaxllm.data.sources import DataError, documents
from jaxllm.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_tokenizer
