"""The base of every recipe section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: every float key refuses nan and ±inf (also when spelled as a string via --set).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
