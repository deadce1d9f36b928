"""The offline GPT-2 tokenizer gives GPT-2's ids and round-trips any text."""

import pytest

from data.tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_encoding


def test_known_gpt2_ids() -> None:
    encoding = gpt2_encoding()
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.encode("The quick brown fox jumps over the lazy dog") == [
        464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290,
    ]  # fmt: skip
    assert encoding.encode(" the") == [262]
    assert encoding.encode("!") == [0]
    assert encoding.encode("\n\n") == [628]
    assert encoding.encode("GPT-2") == [38, 11571, 12, 17]


def test_vocabulary_and_end_of_text() -> None:
    encoding = gpt2_encoding()
    assert encoding.n_vocab == VOCAB_SIZE == 50257
    assert encoding.eot_token == EOT_TOKEN == 50256
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    # As plain text (how documents are tokenized) it is ordinary pieces, never the EOT id.
    assert EOT_TOKEN not in encoding.encode_ordinary("a <|endoftext|> b")
    assert gpt2_encoding() is encoding


@pytest.mark.parametrize(
    "text",
    [
        "emoji 👋🏽 and a family 👨‍👩‍👧 🚀",
        "中文：你好，世界。日本語のテキスト、한국어",
        "café naïve résumé Ωμέγα Ärger ß",
        "runs   of\tspaces\n\n\n  and\r\ntabs\t\t \n",
        "   leading and trailing   ",
        "",
    ],
)
def test_unicode_round_trip(text: str) -> None:
    encoding = gpt2_encoding()
    ids = encoding.encode_ordinary(text)
    assert all(0 <= i < EOT_TOKEN for i in ids)
    assert encoding.decode(ids) == text
