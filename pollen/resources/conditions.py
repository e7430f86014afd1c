"""Status conditions: the one place that decides how a condition list changes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from pollen.resources.models import Condition, ConditionStatus


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, to the second, as Kubernetes writes timestamps."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """The inverse of :func:`format_timestamp`; accepts any RFC 3339 offset."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(
    conditions: Sequence[Condition],
    condition_type: str,
    status: ConditionStatus | bool,
    *,
    reason: str,
    message: str = "",
    observed_generation: int | None = None,
    now: datetime,
) -> list[Condition]:
    """Return ``conditions`` with ``condition_type`` set.

    ``lastTransitionTime`` moves only when the status flips, as in Kubernetes, so that a
    reconciler writing the same condition again leaves the document unchanged.
    """
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    updated: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != condition_type:
            updated.append(cond)
            continue
        found = True
        transition = cond.last_transition_time if cond.status == status else format_timestamp(now)
        updated.append(
            Condition(
                type=condition_type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=transition,
                observed_generation=observed_generation,
            )
        )
    if not found:
        updated.append(
            Condition(
                type=condition_type,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=format_timestamp(now),
                observed_generation=observed_generation,
            )
        )
    return updated
