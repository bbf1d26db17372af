"""A byte-level tokenizer that needs no download: for tiny test models.

Real runs use the model's own tokenizer. Unit tests and the `tiny` preset need
a genuine Hugging Face tokenizer (padding, decoding, special tokens) without a
model hub, so we build one from the 256 byte symbols of GPT-2's byte-level
alphabet with no merges: every UTF-8 byte is one token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer; pad == eos, as on SmolLM2."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab[EOS_TOKEN] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer.padding_side = "left"
    return tokenizer
