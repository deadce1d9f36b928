"""The base every section config derives from: strict, typed, documented fields."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors and every assignment is re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
