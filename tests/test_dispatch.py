"""The dispatcher: task ids, and the timeout of each ``kiq`` (one re-armed timer per sender)."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from taskiq import AsyncTaskiqDecoratedTask, TaskiqFormatter, TaskiqMiddleware
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.message import BrokerMessage, TaskiqMessage

from taskiq_beat import fire_task_id
from taskiq_beat.dispatch import _TASK_ID_NAMESPACE, Dispatcher, describe_error, task_id_of
from taskiq_beat.store import SENT, Fire
from tests.utils import RecordingBroker

UTC = timezone.utc
SCHEDULED = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@settings(max_examples=300, deadline=None)
@given(
    job_id=st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
    scheduled_for=st.datetimes(timezones=st.just(UTC)),
)
def test_task_id_is_uuid5_of_job_and_time(job_id: str, scheduled_for: datetime) -> None:
    expected = uuid.uuid5(_TASK_ID_NAMESPACE, f"{job_id}\x00{scheduled_for.isoformat()}").hex
    assert fire_task_id(job_id, scheduled_for) == expected
    assert task_id_of(job_id, scheduled_for.isoformat()) == expected


class SteeredBroker(RecordingBroker):
    """Each send takes as long as its first argument says (``None``: forever)."""

    async def kick(self, message: Any) -> None:
        delay = self.formatter.loads(message.message).args[0]
        if delay is None:
            await asyncio.Event().wait()
        elif delay:
            await asyncio.sleep(delay)
        await super().kick(message)


def fires(*delays: float | None) -> list[Fire]:
    return [
        Fire(
            run_id=index,
            job_id=f"job-{index}",
            scheduled_for=SCHEDULED + timedelta(seconds=index),
            task_id=uuid.uuid4().hex,
            task_name="tests.steered",
            args=json.dumps([delay]),
            kwargs="{}",
            metadata="{}",
        )
        for index, delay in enumerate(delays)
    ]


@pytest.fixture
async def steered() -> Any:
    broker = SteeredBroker()
    broker.register_task(lambda *args: None, task_name="tests.steered")
    await broker.startup()
    try:
        yield broker
    finally:
        await broker.shutdown()


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_hanging_kiq_times_out_and_stops_the_rest_of_its_batch(
    steered: SteeredBroker, concurrency: int
) -> None:
    dispatcher = Dispatcher(steered, concurrency=concurrency, timeout=0.2)
    # The first sends take a while (the timer fires during the second and is re-armed),
    # then one hangs, then one is quick: with two senders it goes out while the other
    # hangs; with one it comes after the timeout, which fails it at once.
    outcomes = await asyncio.wait_for(dispatcher.send(fires(0.12, 0.12, None, 0)), 5)
    errors = [outcome.error for outcome in outcomes]
    assert errors[:2] == [None, None]
    assert errors[2] == "kiq timed out after 0.2 s"
    if concurrency == 1:
        assert errors[3] == "not sent: kiq timed out after 0.2 s (another send of the batch)"
    else:
        assert errors[3] is None
    assert not any(outcome.released or outcome.final for outcome in outcomes)
    sent = ["job-0", "job-1"] if concurrency == 1 else ["job-0", "job-1", "job-3"]
    assert sorted(m.labels["taskiq_beat_job_id"] for m in steered.sent) == sent
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()  # the sender, with concurrency 1
        assert task is not None
        assert task.cancelling() == 0
    # The next batch is sent as usual: a timeout leaves nothing behind.
    [outcome] = await asyncio.wait_for(dispatcher.send(fires(0)), 5)
    assert outcome.error is None


async def test_labels_carry_each_fire_s_own_scheduled_time(steered: SteeredBroker) -> None:
    dispatcher = Dispatcher(steered, concurrency=4, timeout=1)
    sent = fires(0, 0, 0)
    await dispatcher.send(sent)
    assert {
        m.labels["taskiq_beat_job_id"]: m.labels["taskiq_beat_scheduled_for"] for m in steered.sent
    } == {fire.job_id: fire.scheduled_for.isoformat() for fire in sent}
    assert {m.task_id for m in steered.sent} == {fire.task_id for fire in sent}


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_cancelling_the_sender_is_not_taken_for_a_timeout(
    steered: SteeredBroker, concurrency: int
) -> None:
    dispatcher = Dispatcher(steered, concurrency=concurrency, timeout=30)
    sending = asyncio.create_task(dispatcher.send(fires(None, None, None)))
    await asyncio.sleep(0.05)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sending, 5)


class BusyBroker(RecordingBroker):
    """Each send keeps the CPU for 0.2 ms and never waits, as a broker queueing in memory."""

    async def kick(self, message: Any) -> None:
        until = time.perf_counter() + 0.0002
        while time.perf_counter() < until:
            pass


async def test_senders_that_never_wait_share_short_turns_of_the_event_loop() -> None:
    broker = BusyBroker()
    broker.register_task(lambda *args: None, task_name="tests.steered")
    await broker.startup()
    dispatcher = Dispatcher(broker, concurrency=32, timeout=5)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticker() -> None:  # another task: how long does it wait for each turn?
        last = loop.time()
        while True:
            await asyncio.sleep(0)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        outcomes = await dispatcher.send(fires(*[0.0] * 2000))  # ~0.4 s of sends
    finally:
        ticking.cancel()
        await broker.shutdown()
    assert [outcome.error for outcome in outcomes] == [None] * 2000
    # A turn of 5 ms per sender would hold the loop 32 x 5 ms between two of its turns.
    assert len(gaps) > 20
    assert max(gaps) < 0.05


class Seen(TaskiqMiddleware):
    """Notes every message a middleware is handed, as it is then (a copy of its fields)."""

    def __init__(self, name: str, notes: list[tuple[str, str, dict[str, Any]]]) -> None:
        super().__init__()
        self.name = name
        self.notes = notes

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        self.notes.append((self.name, "pre_send", copy.deepcopy(message.model_dump())))
        if self.name == "first":  # a middleware that changes the message, as some do
            message.labels["added_by_middleware"] = "yes"
        return message

    async def post_send(self, message: TaskiqMessage) -> None:
        self.notes.append((self.name, "post_send", copy.deepcopy(message.model_dump())))


class SeenFormatter(TaskiqFormatter):
    """The broker's formatter, noting each message it turns into a broker message and what
    it made of it."""

    def __init__(self, inner: TaskiqFormatter, notes: list[Any]) -> None:
        self.inner = inner
        self.notes = notes

    def dumps(self, message: TaskiqMessage) -> BrokerMessage:
        dumped = self.inner.dumps(message)
        self.notes.append(("formatter", type(message), copy.deepcopy(message.model_dump())))
        self.notes.append(("kick", dumped.model_dump()))
        return dumped

    def loads(self, message: bytes) -> TaskiqMessage:
        return self.inner.loads(message)


class OwnKickerTask(AsyncTaskiqDecoratedTask[Any, Any]):
    """A task class whose kicker is its own: its fires go through ``kiq`` itself."""

    def kicker(self) -> AsyncKicker[Any, Any]:
        return super().kicker().with_labels(from_own_kicker=1)


def seen_fires(task_name: str) -> list[Fire]:
    payloads = [
        ('[1, "two", {"three": [3]}]', '{"k": {"nested": true}}', '{"tenant": "a", "n": 7}'),
        ("[]", "{}", "{}"),
        ("[null]", '{"x": 1.5}', '{"taskiq_beat_run_id": "overridden by the scheduler"}'),
        ("[2]", "{}", '{"priority": 9, "flag": false, "tags": ["a", "b"]}'),
    ]
    return [
        Fire(
            run_id=1000 + index,
            job_id=f"job-{index}",
            scheduled_for=SCHEDULED + timedelta(seconds=index % 2),
            task_id=uuid.uuid4().hex,
            task_name=task_name,
            args=args,
            kwargs=kwargs,
            metadata=metadata,
        )
        for index, (args, kwargs, metadata) in enumerate(payloads * 2)
    ]


@pytest.mark.parametrize("task_class", [None, OwnKickerTask], ids=["stock", "own-kicker"])
async def test_middlewares_and_formatter_see_each_message_as_kiq_makes_it(
    task_class: type[AsyncTaskiqDecoratedTask[Any, Any]] | None,
) -> None:
    """The dispatcher builds each fire's message without a kicker per fire (sending.py);
    a user's middlewares (pre_send, post_send) and the broker's formatter see exactly what
    ``task.kicker().with_task_id(...).with_labels(...).kiq(...)`` hands them, in the same
    order, and the broker is sent the same bytes."""
    notes: list[Any] = []
    broker = RecordingBroker()
    if task_class is not None:
        broker.decorator_class = task_class
    broker.add_middlewares(Seen("first", notes), Seen("second", notes))
    broker.formatter = SeenFormatter(broker.formatter, notes)

    @broker.task(task_name="tests.seen", retry_on_error=True, max_retries=2, team="red")
    async def seen(*args: Any, **kwargs: Any) -> None:
        pass

    await broker.startup()
    try:
        batch = seen_fires("tests.seen")
        outcomes = await Dispatcher(broker, concurrency=1, timeout=5).send(batch)
        assert outcomes == [SENT] * len(batch)
        by_dispatcher, notes[:] = list(notes), []
        for fire in batch:  # what the dispatcher did before it had templates
            labels = dict(json.loads(fire.metadata))
            labels["taskiq_beat_job_id"] = fire.job_id
            labels["taskiq_beat_scheduled_for"] = fire.scheduled_for.isoformat()
            labels["taskiq_beat_run_id"] = fire.run_id
            kicker = seen.kicker().with_task_id(fire.task_id).with_labels(**labels)
            await kicker.kiq(*json.loads(fire.args), **json.loads(fire.kwargs))
        by_kiq = notes
    finally:
        await broker.shutdown()
    assert len(by_dispatcher) == 6 * len(batch)
    assert by_dispatcher == by_kiq
    first = by_dispatcher[0][2]
    assert first["labels"]["team"] == "red"
    assert first["labels"]["tenant"] == "a"
    assert first["labels"]["taskiq_beat_run_id"] == "1000"
    assert (task_class is not None) == ("from_own_kicker" in first["labels"])
    sent = broker.sent
    assert [m.task_id for m in sent] == [f.task_id for f in batch] * 2
    assert sent[: len(batch)] == sent[len(batch) :]


async def test_a_failing_kick_is_reported_as_kiq_reports_it() -> None:
    broker = RecordingBroker()
    task = broker.register_task(lambda *args, **kwargs: None, task_name="tests.seen")
    broker.fail_sends = True
    await broker.startup()
    try:
        [outcome] = await Dispatcher(broker, concurrency=1, timeout=5).send(
            seen_fires("tests.seen")[:1]
        )
        with pytest.raises(SendTaskError) as raised:
            await task.kiq()
    finally:
        await broker.shutdown()
    assert outcome.error == describe_error(raised.value)
    assert outcome.error.endswith("(caused by ConnectionError: broker unreachable (test))")
    assert not outcome.final


async def test_stored_payloads_that_cannot_be_sent_fail_for_good_naming_the_value() -> None:
    broker = RecordingBroker()
    broker.register_task(lambda *args, **kwargs: None, task_name="tests.seen")
    await broker.startup()
    good = seen_fires("tests.seen")[0]
    try:
        outcomes = await Dispatcher(broker, concurrency=1, timeout=5).send(
            [
                good._replace(args='{"a": 1}'),
                good._replace(kwargs="[1]"),
                good._replace(metadata='"text"'),
                good._replace(metadata="not json"),
                good,
            ]
        )
    finally:
        await broker.shutdown()
    assert [(o.error, o.final) for o in outcomes] == [
        ("stored args are not a JSON list: {'a': 1}", True),
        ("stored kwargs are not a JSON object: [1]", True),
        ("stored metadata is not a JSON object: 'text'", True),
        ("stored metadata is not a JSON object: unreadable JSON 'not json'", True),
        (None, False),
    ]
    assert len(broker.sent) == 1
