"""Where the tokens come from."""

from pydantic import Field

from configs.base import Section


class DataConfig(Section):
    dataset: str = Field(
        "builtin",
        description="'builtin' (zero-download corpus), 'builtin-compact' (the same, ids "
        "renumbered to a 10k vocabulary), 'openwebtext', or a prepared directory",
    )
    data_dir: str = Field(
        "data/cache", description="where 'builtin' and 'openwebtext' are prepared and looked up"
    )
    eval_sequences: int = Field(
        128,
        ge=1,
        description="validation sequences per evaluation, in all ranks together: the same "
        "set on any world size",
    )
    skip_batches: list[int] = Field(
        default_factory=list,
        description="global batches (loader positions, as a diagnosis names them) never "
        "trained on: the loader moves past them; a heal adds the batch it blames",
    )
