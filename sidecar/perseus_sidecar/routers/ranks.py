"""Rank registration and HTTP events from the training hooks (job token; pod IP checked)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Path, status

from perseus_sidecar.api import EventsAccepted, EventsIn, RankRegistered, RankRegistration
from perseus_sidecar.deps import BearerToken, ClientIp, NodeDep
from perseus_sidecar.errors import AuthError
from perseus_sidecar.ranks import EVENT_CODES

router = APIRouter(tags=["ranks"])


@router.post("/ranks", status_code=status.HTTP_201_CREATED)
async def register_rank(
    body: RankRegistration, node: NodeDep, token: BearerToken, source_ip: ClientIp
) -> RankRegistered:
    rank = await node.register_checked(body, token, source_ip)
    return RankRegistered(
        rank_id=rank.rank_id, event_port=node.event_port, schedule_active=rank.controlled
    )


@router.post("/ranks/{rank_id}/events")
async def post_events(
    body: EventsIn,
    node: NodeDep,
    token: BearerToken,
    source_ip: ClientIp,
    rank_id: str = Path(min_length=1, max_length=64),
) -> EventsAccepted:
    if token is None:
        raise AuthError("a job token is required")
    rank = node.authenticate_rank(rank_id, token, source_ip)
    rank.received_ns = time.time_ns()
    for event in body.events:
        rank.on_event(EVENT_CODES[event.kind], event.microbatch, event.t_ns, event.chunk)
    node.metrics.events_http.inc(len(body.events))
    return EventsAccepted(accepted=len(body.events), schedule_active=rank.controlled)
