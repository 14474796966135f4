"""The request body of POST /v1/recommend, validated strictly (pydantic, unknown fields refused).

Hard bounds here keep any body cheap to validate; the server's configured limits (users per
request, largest beam) are checked on top of them (onerec.serve.app).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from onerec.serve.config import HARD_MAX_BEAM, HARD_MAX_USERS

MAX_ITEM_ID = 2**63 - 1  # item ids become int64
MAX_HISTORY_ITEMS = 100_000  # per user, before the server keeps the newest context_len known items
MAX_PROFILE_FEATURES = 256

FLOAT32_MAX = 3.4028234663852886e38  # numeric features become float32: larger values would be inf
MAX_CATEGORY_CHARS = 256

ItemId = Annotated[int, Field(strict=True, ge=0, le=MAX_ITEM_ID)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# Numeric features: finite and within float32; categorical ones: a string (compared with the
# model's vocabulary, onerec/features.py). A missing value is a missing key, not null.
NumericValue = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
CategoryValue = Annotated[str, StringConstraints(max_length=MAX_CATEGORY_CHARS)]
FeatureValue = NumericValue | CategoryValue


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(max_length=MAX_HISTORY_ITEMS, description="item ids, newest last")
    profile: dict[FeatureName, FeatureValue] | None = Field(
        default=None, max_length=MAX_PROFILE_FEATURES,
        description="profile features by name: numbers for numeric features, strings for categorical ones; "
                    "missing ones take the model's training mean / unknown bucket",
    )


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[UserRequest] = Field(min_length=1, max_length=HARD_MAX_USERS)
    k: int | None = Field(default=None, strict=True, ge=1, le=HARD_MAX_BEAM, description="items per user")
    beam: int | None = Field(default=None, strict=True, ge=1, le=HARD_MAX_BEAM, description="beam width")

    @model_validator(mode="after")
    def _k_within_beam(self) -> RecommendRequest:
        if self.k is not None and self.beam is not None and self.k > self.beam:
            raise ValueError(f"k ({self.k}) must not exceed beam ({self.beam})")
        return self
