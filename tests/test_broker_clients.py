"""A worker's channel acknowledges its messages through one Redis client
(resto_celery.broker.OneRedisClient), not a new one per pipeline; real Redis broker."""
from types import SimpleNamespace

import redis

from resto_celery.broker import OneRedisClient, install_consumer_steps


def sync_redis_clients_made(monkeypatch):
    """The sync ``redis.Redis`` clients kombu's Redis channels make from now on, a list that
    grows by the channel of each (not a channel's own asynchronous client, for its BRPOP)."""
    from kombu.transport.redis import Channel

    made = []
    create_client = Channel._create_client

    def counting_create_client(self, asynchronous=False):
        if not asynchronous:
            made.append(self)
        return create_client(self, asynchronous=asynchronous)

    monkeypatch.setattr(Channel, "_create_client", counting_create_client)
    return made


def _receive_and_acknowledge(channel, queue, count):
    """Take ``count`` messages from ``queue`` as a worker does (kept as unacknowledged, then
    acknowledged), through kombu's own ``basic_get``."""
    for _ in range(count):
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        message.ack()


def _publish(app, queue, count):
    with app.producer_or_acquire() as producer:
        for index in range(count):
            producer.publish({"index": index}, routing_key=queue, declare=[])


def test_a_worker_channel_acknowledges_through_one_redis_client(project_celery_app, redis_url, monkeypatch):
    _publish(project_celery_app, "one-client", 6)
    made = sync_redis_clients_made(monkeypatch)
    with project_celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        OneRedisClient(parent=None).start(SimpleNamespace(task_consumer=SimpleNamespace(channel=channel)))
        _receive_and_acknowledge(channel, "one-client", 6)
    assert len(made) == 1
    assert redis.Redis.from_url(redis_url).hlen("unacked") == 0  # every acknowledgement took effect


def test_without_the_step_kombu_makes_a_client_per_pipeline(project_celery_app, monkeypatch):
    """What the step saves, for each message: the client of basic_get's RPOP (a worker's BRPOP
    has one of its own), one to keep the message as unacknowledged, one to acknowledge it.
    If kombu stops doing this, the step can go."""
    _publish(project_celery_app, "one-client", 3)
    made = sync_redis_clients_made(monkeypatch)
    with project_celery_app.connection_for_read() as connection:
        _receive_and_acknowledge(connection.default_channel, "one-client", 3)
    assert len(made) == 3 * 3


def test_a_consumer_without_a_channel_is_left_as_it_is():
    OneRedisClient(parent=None).start(SimpleNamespace(task_consumer=SimpleNamespace()))


def test_the_step_is_added_to_a_worker_once(project_celery_app):
    install_consumer_steps(project_celery_app)
    install_consumer_steps(project_celery_app)
    assert sum(step is OneRedisClient for step in project_celery_app.steps["consumer"]) == 1
