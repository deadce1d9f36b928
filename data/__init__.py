"""Where the tokens come from: the offline GPT-2 tokenizer (`data.tokenizer`), the
prepared-dataset contract (`data.dataset`), dataset preparation (`python -m data.prepare`, text
through `data.text`, the n-gram stream `data.ngram`), the built-in corpus (`data.builtin`) and
the rank-sharded resumable batch loader (`data.loader`); its throughput check is
`python -m bench.loader`.

Nothing is imported here, so `python -m data.prepare` does not pay for torch.
"""
