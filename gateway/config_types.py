"""The constrained types and the section base that every configuration struct is built from.

One place for them, so that the gateway's settings, the edge sections and the drill's settings
mean the same thing by ``PositiveInt`` or ``Port``. Decoding is validation: msgspec checks each
``Meta`` constraint and names the offending path.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]

MiB = 1024 * 1024


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A configuration section: frozen, keyword-only, and unknown keys are an error."""


__all__ = ["MiB", "NonNegativeInt", "Port", "PositiveFloat", "PositiveInt", "Fraction", "Section"]
