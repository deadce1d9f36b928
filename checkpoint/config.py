"""When checkpoints are written, how many are kept, and where a run resumes from."""

from pydantic import Field

from configs.base import Section


class CheckpointConfig(Section):
    interval: int = Field(100, ge=0, description="steps between checkpoints; 0 only on demand")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept")
    milestone_interval: int = Field(0, ge=0, description="also keep every Nth step forever; 0 off")
    resume: str = Field("auto", description="'auto' (latest if any), 'never', or a checkpoint path")
    init_from: str | None = Field(
        None, description="start weights (and optimizer) from another run's checkpoint, new step 0"
    )
    force_resume: bool = Field(
        False, description="resume even if run-changing keys (model, optimizer, data) differ"
    )
