"""Reading what the code under test published to the event bus's SQL store."""

from __future__ import annotations

from contentml.events import Event, SqlBus
from contentml.settings import Settings


def published(settings: Settings) -> list[Event]:
    """Every event in the settings' SQL store, oldest first."""
    bus = SqlBus(settings.backend_store)
    try:
        return [event for _, event in bus.after(0)]
    finally:
        bus.close()
