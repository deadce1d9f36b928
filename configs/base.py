"""The base every section config derives from: strict, typed, documented fields."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors and every assignment is re-validated.

    No float may be inf or NaN: a non-finite learning rate, say, would train to NaN and exit 0.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )
