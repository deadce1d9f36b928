"""Where the tokens come from: the offline GPT-2 tokenizer (`data.tokenizer`), dataset
preparation (`python -m data.prepare`), the built-in corpus (`data.builtin`), the rank-sharded
resumable batch loader (`data.loader`) and a throughput check (`python -m data.bench`).

Nothing is imported here, so `python -m data.prepare` does not pay for torch.
"""
