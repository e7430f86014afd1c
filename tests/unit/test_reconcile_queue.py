"""The reconcile work queue: client-go semantics on a clock the test drives."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.reconcilers._queue import Drop, Outcome, Requeue, Retry, Success, WorkQueue

BASE, CAP = 0.5, 8.0


def make() -> WorkQueue[str]:
    return WorkQueue(base_delay=BASE, max_delay=CAP)


def test_adding_a_waiting_key_again_is_a_no_op() -> None:
    queue = make()
    queue.add("a", 0)
    queue.add("b", 0)
    queue.add("a", 0)
    assert [queue.pop(0), queue.pop(0), queue.pop(0)] == ["a", "b", None]


def test_a_key_added_while_processing_runs_again_after_done_never_concurrently() -> None:
    queue = make()
    queue.add("a", 0)
    assert queue.pop(0) == "a"
    queue.add("a", 1)
    queue.add("a", 1)
    assert queue.pop(1) is None  # still processing: not handed out twice
    queue.done("a", 2, Success())
    assert queue.pop(2) == "a"
    queue.done("a", 3, Success())
    assert queue.pop(3) is None


def test_done_of_a_key_not_processing_is_an_error() -> None:
    queue = make()
    with pytest.raises(ValueError, match="not being processed"):
        queue.done("a", 0, Success())


def test_failures_back_off_exponentially_up_to_the_cap_and_success_resets() -> None:
    queue = make()
    now = 0.0
    queue.add("a", now)
    delays = []
    for _ in range(7):
        assert queue.pop(now) == "a"
        queue.done("a", now, Retry())
        due = queue.due("a")
        assert due is not None
        delays.append(due - now)
        assert queue.pop(due - 0.001) is None  # not before its time
        now = due
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert queue.pop(now) == "a"
    queue.done("a", now, Success())
    assert queue.failures("a") == 0
    queue.add("a", now)
    assert queue.pop(now) == "a"
    queue.done("a", now, Retry())
    assert queue.due("a") == now + BASE


def test_a_retry_with_a_delay_uses_it_and_still_counts() -> None:
    queue = make()
    queue.add("a", 0)
    queue.pop(0)
    queue.done("a", 0, Retry(3.0))
    assert queue.due("a") == 3.0
    assert queue.failures("a") == 1


def test_requeue_after_is_not_a_failure() -> None:
    queue = make()
    queue.add("a", 0)
    queue.pop(0)
    queue.done("a", 0, Retry())
    queue.pop(BASE)
    queue.done("a", BASE, Requeue(10.0))
    assert queue.failures("a") == 0
    assert queue.next_deadline() == BASE + 10.0


def test_drop_forgets_the_key() -> None:
    queue = make()
    queue.add("a", 0)
    queue.pop(0)
    queue.done("a", 0, Drop())
    assert queue.pop(1000) is None
    assert queue.next_deadline() is None
    assert len(queue) == 0


def test_of_two_delayed_adds_the_earliest_wins() -> None:
    queue = make()
    queue.add_after("a", 10, 0)
    queue.add_after("a", 5, 0)
    queue.add_after("a", 20, 0)
    assert queue.next_deadline() == 5
    assert queue.pop(4.9) is None
    assert queue.pop(5) == "a"
    queue.done("a", 5, Success())
    assert queue.pop(100) is None  # the later adds were folded into the first


def test_a_change_during_processing_is_run_at_once_even_after_a_failure() -> None:
    queue = make()
    queue.add("a", 0)
    queue.pop(0)
    queue.add("a", 0.1)  # the object changed: the new state deserves a look now
    queue.done("a", 0.2, Retry())
    assert queue.pop(0.2) == "a"


# --- properties ------------------------------------------------------------------------------

OUTCOMES: list[Outcome] = [Success(), Retry(), Retry(0.25), Requeue(1.0), Drop()]
KEYS = st.sampled_from(["a", "b", "c", "d"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS),
        st.tuples(st.just("add_after"), KEYS, st.floats(0, 20)),
        st.tuples(st.just("advance"), st.floats(0, 10)),
        st.tuples(st.just("pop")),
        st.tuples(st.just("done"), st.integers(0, 3), st.sampled_from(range(len(OUTCOMES)))),
    ),
    max_size=80,
)


@dataclass
class Model:
    """What a set of workers using the queue would see."""

    queue: WorkQueue[str] = field(default_factory=make)
    now: float = 0.0
    processing: list[str] = field(default_factory=list)
    # Keys added (at once or delayed) and not yet handed out since: each must be popped later.
    owed: set[str] = field(default_factory=set)

    def pop(self) -> str | None:
        key = self.queue.pop(self.now)
        if key is not None:
            assert key not in self.processing, f"{key} handed out while being processed"
            self.processing.append(key)
            self.owed.discard(key)
        return key

    def done(self, key: str, outcome: Outcome) -> None:
        self.processing.remove(key)
        before = self.now
        self.queue.done(key, self.now, outcome)
        if isinstance(outcome, Retry):
            due = self.queue.due(key)
            assert due is not None
            assert due - before <= CAP, "backoff beyond the cap"
            self.owed.add(key)
        elif isinstance(outcome, Requeue):
            self.owed.add(key)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_never_two_of_one_key_at_once_every_add_popped_backoff_capped(ops: list[tuple]) -> None:
    model = Model()
    for op in ops:
        match op:
            case ("add", key):
                model.queue.add(key, model.now)
                model.owed.add(key)
            case ("add_after", key, delay):
                model.queue.add_after(key, delay, model.now)
                model.owed.add(key)
            case ("advance", seconds):
                model.now += seconds
            case ("pop",):
                model.pop()
            case ("done", index, outcome):
                if model.processing:
                    key = model.processing[index % len(model.processing)]
                    model.done(key, OUTCOMES[outcome])
    # Drain: finish what runs, then keep popping (succeeding) until nothing is left.
    for key in list(model.processing):
        model.done(key, Success())
    for _ in range(1000):
        key = model.pop()
        if key is not None:
            model.done(key, Success())
            continue
        deadline = model.queue.next_deadline()
        if deadline is None:
            break
        model.now = max(model.now, deadline)
    assert not model.owed, f"added but never handed out: {sorted(model.owed)}"
    assert len(model.queue) == 0
    assert model.queue.processing == 0
