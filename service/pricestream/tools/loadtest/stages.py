"""Load shapes in the style of k6: stages ramp the number of virtual users linearly to a target."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")


class StageError(ValueError):
    """A stage list or profile that cannot be used; the message is one sentence."""


@dataclass(frozen=True)
class Stage:
    seconds: float
    target: int


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise StageError(f"{text!r} is not a duration like 30s, 1m or 1m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_stages(text: str) -> list[Stage]:
    """'30s:100,1m:100,10s:0' -> stages; each ramps from the previous target to its own."""
    stages = []
    for part in text.split(","):
        duration, sep, target = part.strip().partition(":")
        if not sep:
            raise StageError(f"stage {part.strip()!r} is not DURATION:USERS, e.g. 30s:100")
        try:
            users = int(target)
        except ValueError:
            raise StageError(f"stage {part.strip()!r}: {target!r} is not a whole number") from None
        if users < 0:
            raise StageError(f"stage {part.strip()!r}: users cannot be negative")
        seconds = parse_duration(duration)
        if seconds <= 0:
            raise StageError(f"stage {part.strip()!r}: the duration must be positive")
        stages.append(Stage(seconds, users))
    return stages


# Named shapes at scale 1; `--scale` multiplies users (and soak's duration stays put).
PROFILES: dict[str, str] = {
    "smoke": "3s:20,5s:20,2s:0",
    "spike": "10s:100,20s:100,2s:1000,30s:1000,5s:100,20s:100,5s:0",
    "capacity": "30s:1000,30s:1000,30s:3000,30s:3000,30s:5000,60s:5000,10s:0",
    "soak": "1m:1000,30m:1000,1m:0",
}


def profile_stages(name: str, scale: float = 1.0) -> list[Stage]:
    if name not in PROFILES:
        raise StageError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}")
    if scale <= 0:
        raise StageError("--scale must be positive")
    return [Stage(s.seconds, round(s.target * scale)) for s in parse_stages(PROFILES[name])]


@dataclass(frozen=True)
class Schedule:
    stages: tuple[Stage, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def peak(self) -> int:
        return max(s.target for s in self.stages)

    def stage_at(self, t: float) -> int:
        """Index of the stage running at t seconds (the last one after the end)."""
        elapsed = 0.0
        for index, stage in enumerate(self.stages):
            elapsed += stage.seconds
            if t < elapsed:
                return index
        return len(self.stages) - 1

    def users_at(self, t: float) -> float:
        """Virtual users wanted at t seconds: linear from the previous target to this one."""
        start_users, elapsed = 0.0, 0.0
        for stage in self.stages:
            if t < elapsed + stage.seconds:
                fraction = (t - elapsed) / stage.seconds
                return start_users + (stage.target - start_users) * fraction
            start_users, elapsed = float(stage.target), elapsed + stage.seconds
        return float(self.stages[-1].target)

    def share(self, t: float, worker: int, workers: int) -> int:
        """This worker's part of users_at(t); the parts always add up to the rounded total."""
        total = round(self.users_at(t))
        return total // workers + (1 if worker < total % workers else 0)
