"""What the serving loop tells one request's handler, from the router thread (pdserve/serve/loop.py)."""

from __future__ import annotations

from dataclasses import dataclass

from router.request import Request, State


@dataclass(frozen=True)
class Tokens:
    ids: list[int]


@dataclass(frozen=True)
class Finished:
    request: Request  # as it finished (through a deployment, a copy of the one submitted)

    @property
    def ok(self) -> bool:
        return self.request.state == State.DONE


@dataclass(frozen=True)
class RouterDied:
    error: str


@dataclass(frozen=True)
class Expired:
    """Not sent by the loop: what `InFlight.next` returns once the request's deadline has passed."""

    message: str


Event = Tokens | Finished | RouterDied | Expired
Outcome = Finished | RouterDied | Expired  # how a request's events end
