"""The physical resolution callers ask tiles and regions at, and the one formula that turns a
magnification into µm/px (every service goes through :meth:`Resolution.to_mpp`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smartpath.core.errors import InvalidArgumentError

if TYPE_CHECKING:
    from smartpath.core.slides.slide import SlideInfo

MPP_RANGE = (0.01, 1000.0)  # µm/px a caller may ask for
MAGNIFICATION_RANGE = (0.01, 200.0)
MPP_AT_1X = 10.0  # the convention when a slide does not say: 40x ≈ 0.25 µm/px


@dataclass(frozen=True)
class Resolution:
    """Exactly one of ``mpp`` (µm/px) or ``magnification`` (objective power: 20 for "20x").

    A magnification means the slide's own optics: :meth:`to_mpp` gives
    ``mpp_level0 · objective_power / magnification`` when the slide reports both its level-0
    MPP and its objective power (20x on a 40x scan at 0.2527 µm/px is 0.5054 µm/px), and the
    convention ``10 / magnification`` µm/px otherwise. Bad values are INVALID_ARGUMENT.
    """

    mpp: float | None = None
    magnification: float | None = None

    def __post_init__(self) -> None:
        if (self.mpp is None) == (self.magnification is None):
            raise InvalidArgumentError(
                "give exactly one of resolution.mpp or resolution.magnification"
            )
        if self.mpp is not None and not (
            math.isfinite(self.mpp) and MPP_RANGE[0] <= self.mpp <= MPP_RANGE[1]
        ):
            raise InvalidArgumentError(
                f"resolution.mpp={self.mpp!r} must be in {MPP_RANGE[0]:g}–{MPP_RANGE[1]:g} µm/px"
            )
        mag = self.magnification
        if mag is not None and not (
            math.isfinite(mag) and MAGNIFICATION_RANGE[0] <= mag <= MAGNIFICATION_RANGE[1]
        ):
            raise InvalidArgumentError(
                f"resolution.magnification={mag!r} must be "
                f"{MAGNIFICATION_RANGE[0]:g}–{MAGNIFICATION_RANGE[1]:g}"
            )

    def to_mpp(self, info: SlideInfo) -> float:
        """This resolution in µm/px on the slide described by ``info`` (see the class)."""
        if self.mpp is not None:
            return self.mpp
        assert self.magnification is not None
        if info.objective_power and info.mpp:
            return info.mpp * info.objective_power / self.magnification
        return MPP_AT_1X / self.magnification
