"""The audit page's verifications (protocols/webui/audit.py ``Verifier``): in the background, one at a
time; a page waits only briefly, then shows the last result and that one is under way; a fresh result
is reused, "verify now" never is."""

from __future__ import annotations

import threading
import time

from safepacs.audit.chain import Verification
from safepacs.errors import AuditError
from safepacs.protocols.webui.audit import Verifier


class SlowCheck:
    """A verification that runs until released, counting its runs."""

    def __init__(self, result: Verification) -> None:
        self.result = result
        self.release = threading.Event()
        self.runs = 0

    def __call__(self) -> Verification:
        self.runs += 1
        assert self.release.wait(10)
        return self.result


INTACT = Verification(True, 10, 0)


def test_a_slow_verification_runs_in_the_background_and_its_result_is_shown_once_done() -> None:
    verifier, check = Verifier(), SlowCheck(INTACT)
    started = time.monotonic()
    waiting = verifier.status(check, now=False, wait=0.05)
    assert time.monotonic() - started < 5  # the page did not wait for it
    assert waiting.last is None and waiting.running_since is not None and waiting.error is None
    again = verifier.status(check, now=False, wait=0.05)  # one at a time: no second run
    assert again.running_since == waiting.running_since and check.runs == 1
    check.release.set()
    done = verifier.status(check, now=False, wait=5)
    assert done.last is not None and done.last.result is INTACT and done.running_since is None
    assert done.last.began == waiting.running_since


def test_a_fresh_result_is_reused_and_verify_now_always_checks_again() -> None:
    verifier, check = Verifier(), SlowCheck(INTACT)
    check.release.set()
    first = verifier.status(check, now=False, wait=5).last
    assert first is not None and first.fresh(first.at)
    assert verifier.status(check, now=False, wait=5).last is first and check.runs == 1
    now = verifier.status(check, now=True, wait=5).last
    assert now is not None and now is not first and now.began >= first.at and check.runs == 2


def test_verify_now_does_not_take_a_check_begun_before_it() -> None:
    verifier, check = Verifier(), SlowCheck(INTACT)
    verifier.status(check, now=False, wait=0)  # under way, blocked
    answers: list[object] = []
    asker = threading.Thread(target=lambda: answers.append(verifier.status(check, now=True, wait=5)))
    asker.start()
    time.sleep(0.1)
    check.release.set()
    asker.join(10)
    (answer,) = answers
    assert check.runs == 2  # the one under way, then one begun after "verify now"
    assert answer.last is not None and answer.running_since is None  # type: ignore[attr-defined]


def test_a_check_that_fails_leaves_the_last_result_and_says_why() -> None:
    verifier, check = Verifier(), SlowCheck(INTACT)
    check.release.set()
    first = verifier.status(check, now=False, wait=5).last

    def broken() -> Verification:
        raise AuditError("the audit trail cannot be written; the request is refused")

    failed = verifier.status(broken, now=True, wait=5)
    assert failed.last is first and failed.running_since is None
    assert failed.error is not None and "cannot be written" in failed.error
