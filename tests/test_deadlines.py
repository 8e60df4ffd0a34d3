"""The deadline book: ordering, replacement, removal, and agreement with a plain dict model."""

from __future__ import annotations

from typing import Dict, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from hangwatch._deadlines import DeadlineBook


class TestDeadlineBook:
    def test_next_deadline_is_the_earliest(self) -> None:
        """next_deadline() is the smallest deadline among active timers."""
        book: DeadlineBook[int, str] = DeadlineBook()
        assert book.next_deadline() is None
        book.set(1, "a", 5.0, "a")
        book.set(2, "b", 3.0, "b")
        book.set(1, "c", 4.0, "c")
        assert book.next_deadline() == 3.0
        book.remove(2, "b")
        assert book.next_deadline() == 4.0

    def test_reacquire_replaces_the_timer(self) -> None:
        """Setting a held (worker, scope) again replaces its deadline: the last acquire wins."""
        book: DeadlineBook[int, str] = DeadlineBook()
        book.set(1, "s", 1.0, "first")
        book.set(1, "s", 10.0, "second")
        assert len(book) == 1
        assert book.expired(5.0) == {}
        assert book.expired(10.0) == {1: ["second"]}

    def test_expired_does_not_remove(self) -> None:
        """expired() reports, the caller clears: unreaped timers are reported again."""
        book: DeadlineBook[int, str] = DeadlineBook()
        book.set(1, "a", 1.0, "a")
        book.set(1, "b", 2.0, "b")
        book.set(2, "c", 9.0, "c")
        assert book.expired(2.0) == {1: ["a", "b"]}
        assert book.expired(2.0) == {1: ["a", "b"]}
        assert sorted(book.drop_worker(1)) == ["a", "b"]
        assert book.expired(100.0) == {2: ["c"]}
        assert not book.has_worker(1) and book.has_worker(2)

    def test_dead_entries_do_not_accumulate(self) -> None:
        """Replacing a timer a million times keeps the heap proportional to the live timers."""
        book: DeadlineBook[int, int] = DeadlineBook()
        for i in range(100_000):
            book.set(1, "s", float(i % 97), i)
        assert len(book) == 1
        assert len(book._heap) <= 2 * len(book) + 65

    def test_release_of_unknown_timer_is_harmless(self) -> None:
        """Removing a timer that is not held returns False and changes nothing."""
        book: DeadlineBook[int, str] = DeadlineBook()
        assert book.remove(3, "nope") is False
        assert book.drop_worker(3) == []


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "remove", "drop"]),
        st.integers(0, 4),
        st.sampled_from(["a", "b", "c"]),
        st.floats(0, 100, allow_nan=False),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.floats(0, 100, allow_nan=False))
def test_book_agrees_with_a_dict(operations: list, cutoff: float) -> None:
    """Any sequence of operations leaves the book answering exactly as a plain dict would."""
    book: DeadlineBook[int, Tuple[int, str, float]] = DeadlineBook()
    model: Dict[Tuple[int, str], float] = {}
    for op, worker, scope, deadline in operations:
        if op == "set":
            book.set(worker, scope, deadline, (worker, scope, deadline))
            model[(worker, scope)] = deadline
        elif op == "remove":
            assert book.remove(worker, scope) == ((worker, scope) in model)
            model.pop((worker, scope), None)
        else:
            dropped = book.drop_worker(worker)
            expect = sorted((w, s, d) for (w, s), d in model.items() if w == worker)
            assert sorted(dropped) == expect
            model = {k: v for k, v in model.items() if k[0] != worker}
    assert len(book) == len(model)
    assert book.next_deadline() == (min(model.values()) if model else None)
    got = {w: sorted(p) for w, p in book.expired(cutoff).items()}
    want: Dict[int, list] = {}
    for (w, s), d in model.items():
        if d <= cutoff:
            want.setdefault(w, []).append((w, s, d))
    assert got == {w: sorted(p) for w, p in want.items()}
