"""The tally of refused connections (safepacs._net.RefusalTally): a flood of bare connections costs one
report per address per interval, not one per connection, and past the address limit the rest are
counted together.  Time is a fake clock; the listening socket is a real one."""

from __future__ import annotations

import gc
import socket
import warnings

import pytest

from safepacs import _net
from safepacs._net import OTHER_ADDRESSES, RefusalTally, bind_listener


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_net.time, "monotonic", fake)
    return fake


Reports = list[tuple[str, dict[str, int]]]


def tally(reports: Reports, **kwargs: float | int) -> RefusalTally:
    return RefusalTally(lambda address, counts: reports.append((address, counts)), **kwargs)  # type: ignore[arg-type]


def test_the_first_refusal_of_an_address_is_reported_at_once(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports)
    assert t.add("192.0.2.1", "no association") == 1
    assert reports == [("192.0.2.1", {"no association": 1})]


def test_a_flood_is_reported_once_per_interval_with_its_counts(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports, interval=60.0)
    for _ in range(100):
        t.add("192.0.2.1", "no association")
    t.add("192.0.2.1", "tls handshake")
    assert reports == [("192.0.2.1", {"no association": 1})]
    clock.now += 30
    t.flush_due()
    assert len(reports) == 1  # not yet: the interval has not passed
    clock.now += 31
    t.flush_due()
    assert reports[1] == ("192.0.2.1", {"no association": 99, "tls handshake": 1})
    assert t.totals == {"no association": 100, "tls handshake": 1}


def test_add_returns_the_running_total_of_its_reason_over_all_addresses(clock: Clock) -> None:
    t = tally([])
    assert [t.add(f"192.0.2.{i}", "no request") for i in range(1, 4)] == [1, 2, 3]
    assert t.add("192.0.2.1", "other") == 1


def test_after_its_interval_the_next_refusal_is_reported_at_once(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports, interval=10.0)
    t.add("192.0.2.1", "r")
    t.add("192.0.2.1", "r")
    clock.now += 11
    t.add("192.0.2.1", "r")  # due: reported with what accumulated
    assert reports == [("192.0.2.1", {"r": 1}), ("192.0.2.1", {"r": 2})]


def test_a_quiet_address_is_forgotten_after_a_whole_interval(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports, interval=10.0, max_addresses=1)
    t.add("192.0.2.1", "r")
    clock.now += 11
    t.flush_due()  # nothing new from .1 for a whole interval: its place is free again
    t.add("192.0.2.2", "r")
    assert reports == [("192.0.2.1", {"r": 1}), ("192.0.2.2", {"r": 1})]


def test_past_the_address_limit_the_rest_are_counted_together(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports, interval=60.0, max_addresses=2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.3"):
        t.add(address, "r")
    assert [a for a, _ in reports] == ["192.0.2.1", "192.0.2.2", OTHER_ADDRESSES]
    t.flush_due(force=True)
    assert reports[-1] == (OTHER_ADDRESSES, {"r": 2})
    assert sum(sum(c.values()) for _, c in reports) == 5  # every refusal counted exactly once


def test_force_reports_every_address_with_counts_and_nothing_twice(clock: Clock) -> None:
    reports: Reports = []
    t = tally(reports)
    t.add("192.0.2.1", "r")
    t.add("192.0.2.1", "r")
    t.add("192.0.2.2", "r")
    del reports[:]
    t.flush_due(force=True)
    assert reports == [("192.0.2.1", {"r": 1})]
    t.flush_due(force=True)
    assert reports == [("192.0.2.1", {"r": 1})]


def test_a_listener_on_port_0_gets_a_free_port_and_does_not_block() -> None:
    listener = bind_listener("127.0.0.1", 0)
    try:
        host, port = listener.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
        assert listener.getblocking() is False
        assert listener.proto == socket.IPPROTO_TCP
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody is connecting: a worker racing for it returns at once
    finally:
        listener.close()


def _bind_taken_port() -> list[warnings.WarningMessage]:
    """Bind a port that is taken; the ResourceWarnings of what was left open."""
    first = bind_listener("127.0.0.1", 0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(OSError, match="in use"):
                bind_listener("127.0.0.1", first.getsockname()[1])
            gc.collect()
    finally:
        first.close()
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_port_in_use_cannot_be_bound_twice() -> None:
    _bind_taken_port()


def test_a_failed_bind_leaves_no_socket_open() -> None:
    assert _bind_taken_port() == []
