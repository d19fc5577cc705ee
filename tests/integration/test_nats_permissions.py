"""Least privilege on NATS: each service's user may use its own subjects and nothing else.

A real nats-server runs ``deploy/nats/loom.conf`` with fresh passwords and is
provisioned as ``make run`` does. Each case logs in as one user and tries a
subject: an allowed publish reaches an admin subscriber, an allowed
subscription gets an admin's message, and a refused one comes back from the
server as a permissions violation on the connection's error callback.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.common.launch.mesh import SERVICES, Mesh
from services.common.launch.nats_server import NatsServer, new_passwords
from services.common.nats_options import inbox_prefix
from services.common.pb.loom.v1 import gateway_pb2
from tests.support import NatsHandle, start_nats

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsHandle]:
    handle = start_nats()
    try:
        handle.provision(tmp_path_factory.mktemp("provision"))
        yield handle
    finally:
        handle.stop()


class Login:
    """One user's connection, keeping what the server refused (it reports on the error callback)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.refusals: list[str] = []
        self.nc = Client()

    async def connect(self, server: NatsServer) -> Login:
        async def on_error(exc: Exception) -> None:
            self.refusals.append(str(exc).lower())

        await self.nc.connect(
            server.url,
            user=self.user,
            password=server.passwords[self.user],
            inbox_prefix=inbox_prefix(self.user),  # as Bus.connect does
            error_cb=on_error,
            allow_reconnect=False,
        )
        return self

    def refused(self, op: str, subject: str) -> bool:
        return any(f'permissions violation for {op} to "{subject.lower()}"' in r for r in self.refusals)

    async def settle(self) -> None:
        await self.nc.flush()  # the server answers -ERR before it answers the flush's PING
        await asyncio.sleep(0.05)  # the error callback runs as a task of its own


@pytest.fixture
async def admin(server: NatsHandle) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url)
    yield nc
    await nc.close()


async def login(server: NatsHandle, user: str) -> Login:
    assert server.server is not None
    return await Login(user).connect(server.server)


async def publishes(server: NatsHandle, admin: Client, user: str, subject: str) -> bool:
    """True when ``user``'s publish on ``subject`` reaches a subscriber; False when the server refused it."""
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await got.put(msg.data)

    sub = await admin.subscribe(subject, cb=on_msg)
    await admin.flush()
    me = await login(server, user)
    try:
        await me.nc.publish(subject, b"probe")
        await me.settle()
        if me.refused("publish", subject):
            return False
        assert await asyncio.wait_for(got.get(), 5) == b"probe"
        return True
    finally:
        await sub.unsubscribe()
        await me.nc.close()


async def subscribes(server: NatsHandle, admin: Client, user: str, subject: str, probe: str) -> bool:
    """True when ``user`` subscribed to ``subject`` gets an admin's message on ``probe``; False when refused."""
    me = await login(server, user)
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await got.put(msg.data)

    try:
        await me.nc.subscribe(subject, cb=on_msg)
        await me.settle()
        if me.refused("subscription", subject):
            return False
        await admin.publish(probe, b"probe")
        assert await asyncio.wait_for(got.get(), 5) == b"probe"
        return True
    finally:
        await me.nc.close()


# (user, subject, allowed): the stage hops of deploy/nats/loom.conf and a few things no one else may do.
PUBLISH = [
    ("gateway", "loom.pre.text", True),
    ("gateway", "loom.req.embed", True),
    ("gateway", "loom.fuse.0", False),  # only stages send parts to fusion
    ("gateway", "loom.alert.p1", False),
    ("gateway", "loom.tel.monitor", False),  # no one speaks for another service's telemetry
    ("preprocess", "loom.infer.minilm", True),
    ("preprocess", "loom.post.embed", False),  # the example: a stage may only feed the next kind
    ("preprocess", "loom.pre.text", False),
    ("preprocess", "loom.tel.gateway", False),  # no one speaks for another service's telemetry
    ("inference", "loom.post.embed", True),
    ("inference", "loom.pre.text", False),
    ("inference", "loom.models.control", False),  # it answers those, it does not ask
    ("postprocess", "loom.fuse.2", True),
    ("postprocess", "loom.pre.text", True),  # chains: OCR text goes on through the text model
    ("postprocess", "loom.infer.minilm", False),
    ("fusion", "_INBOX.gateway.abc.def", True),
    ("fusion", "loom.pre.text", False),
    ("fusion", "loom.req.embed", False),
    ("monitor", "loom.alert.p1", True),
    ("monitor", "loom.infer.minilm", False),  # the example
    ("monitor", "loom.fb.embed", False),
    ("monitor", "loom.audit.monitor", True),  # its own admin routes (drift baseline, evaluate)
    ("monitor", "loom.audit.model", False),  # the gateway's admin entries are not the monitor's to write
    ("preprocess", "loom.audit.auth", True),  # refused calls, after a look at how full the stream is:
    ("preprocess", "$JS.API.STREAM.INFO.LOOM_AUDIT", True),
    ("preprocess", "loom.audit.rollout", False),
    ("publisher", "loom.audit.auth", False),
    ("publisher", "loom.req.embed", True),
    ("publisher", "loom.pre.text", False),
    ("publisher", "loom.infer.minilm", False),
]

SUBSCRIBE = [  # (user, subscription, a subject it covers, allowed)
    ("gateway", "_INBOX.gateway.>", "_INBOX.gateway.x.y", True),
    ("gateway", "loom.pre.>", "loom.pre.text", False),
    ("gateway", "loom.tel.>", "loom.tel.inference", False),
    ("preprocess", "loom.pre.text", "loom.pre.text", True),
    ("preprocess", "loom.infer.>", "loom.infer.minilm", False),  # the example
    ("preprocess", "_INBOX.gateway.>", "_INBOX.gateway.x", False),  # no one reads another's answers
    ("preprocess", "_INBOX.>", "_INBOX.x", False),
    ("inference", "loom.infer.minilm", "loom.infer.minilm", True),
    ("inference", "loom.models.list", "loom.models.list", True),
    ("inference", "loom.fb.*", "loom.fb.embed", False),
    ("postprocess", "loom.post.embed", "loom.post.embed", True),
    ("postprocess", "loom.fuse.>", "loom.fuse.0", False),
    ("fusion", "loom.fuse.1", "loom.fuse.1", True),
    ("fusion", "loom.post.>", "loom.post.embed", False),
    ("monitor", "loom.tel.>", "loom.tel.preprocess", True),
    ("monitor", "loom.fb.*", "loom.fb.embed", True),
    ("monitor", "loom.req.>", "loom.req.embed", False),
    ("publisher", "loom.res.embed", "loom.res.embed", True),
    ("publisher", "loom.req.>", "loom.req.embed", False),  # other publishers' requests
    ("publisher", "loom.tel.>", "loom.tel.gateway", False),
]


@pytest.mark.parametrize(("user", "subject", "allowed"), PUBLISH)
async def test_publish_is_allowed_only_on_the_users_own_subjects(
    server: NatsHandle, admin: Client, user: str, subject: str, allowed: bool
) -> None:
    assert await publishes(server, admin, user, subject) is allowed


@pytest.mark.parametrize(("user", "subject", "probe", "allowed"), SUBSCRIBE)
async def test_subscribe_is_allowed_only_on_the_users_own_subjects(
    server: NatsHandle, admin: Client, user: str, subject: str, probe: str, allowed: bool
) -> None:
    assert await subscribes(server, admin, user, subject, probe) is allowed


@pytest.mark.parametrize("user", [*SERVICES, "publisher"])
async def test_no_service_may_create_or_delete_a_stream(server: NatsHandle, user: str) -> None:
    me = await login(server, user)
    js = me.nc.jetstream(timeout=0.25)  # a refused API call is never answered: the client times out
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_stream(name="EVIL", subjects=["evil.>"])
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream("LOOM_AUDIT")
        with pytest.raises(nats.errors.TimeoutError):
            await js.purge_stream("LOOM_DLQ")
        await me.settle()
        assert me.refused("publish", "$JS.API.STREAM.CREATE.EVIL")
        assert me.refused("publish", "$JS.API.STREAM.DELETE.LOOM_AUDIT")
        assert me.refused("publish", "$JS.API.STREAM.PURGE.LOOM_DLQ")
    finally:
        await me.nc.close()


async def test_a_publisher_cannot_read_the_kv_buckets(server: NatsHandle) -> None:
    me = await login(server, "publisher")
    js = me.nc.jetstream(timeout=0.25)
    try:
        for bucket in ("loom_pipelines", "loom_models", "loom_results"):
            with pytest.raises(nats.errors.TimeoutError):
                await js.key_value(bucket)
            with pytest.raises(nats.errors.TimeoutError):
                await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.embed")
        await me.settle()
        assert me.refused("publish", "$JS.API.STREAM.INFO.KV_loom_pipelines")
        assert me.refused("publish", "$JS.API.STREAM.MSG.GET.KV_loom_models")
        # What it may do: bind the results stream it reads.
        assert (await js.stream_info("LOOM_RES")).config.name == "LOOM_RES"
    finally:
        await me.nc.close()


async def test_the_registry_is_written_by_gateway_and_monitor_only(server: NatsHandle) -> None:
    for user, allowed in (("gateway", True), ("monitor", True), ("inference", False), ("preprocess", False)):
        me = await login(server, user)
        js = me.nc.jetstream(timeout=0.25)
        try:
            if user in ("inference", "gateway", "monitor"):  # the ones that bind the registry
                kv = await js.key_value("loom_models")
            else:
                with pytest.raises(nats.errors.TimeoutError):
                    await js.key_value("loom_models")
                continue
            if allowed:
                assert await kv.put(f"probe_{user}", b"{}") > 0
            else:
                with pytest.raises(nats.errors.TimeoutError):
                    await kv.put(f"probe_{user}", b"{}")
                await me.settle()
                assert me.refused("publish", f"$KV.loom_models.probe_{user}")
        finally:
            await me.nc.close()


def test_every_service_of_the_mesh_logs_in_as_itself(mesh: Mesh) -> None:
    """The session mesh runs deploy/nats/loom.conf: no service connects as admin or without a user."""
    url = f"http://127.0.0.1:{mesh.ports['nats_monitor']}/connz?auth=true&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as resp:
        connections = json.load(resp)["connections"]
    users = {(c.get("name"), c.get("authorized_user")) for c in connections}
    for service in SERVICES:
        assert (service, service) in users, sorted(users, key=str)
    assert not [c for c in connections if c.get("name") in SERVICES and c.get("authorized_user") != c["name"]]
    assert "admin" in mesh.nats_url and mesh.nats_passwords["admin"] not in mesh.nats_address


async def test_an_event_publisher_sends_durable_requests_and_reads_results_as_itself(mesh: Mesh) -> None:
    """The publisher role end to end: loom.req.<pipeline> in, the answer from the LOOM_RES stream out."""
    refusals: list[str] = []

    async def on_error(exc: Exception) -> None:
        refusals.append(str(exc))

    nc = await nats.connect(
        mesh.nats_address,
        user="publisher",
        password=mesh.nats_passwords["publisher"],
        inbox_prefix=inbox_prefix("publisher"),
        error_cb=on_error,
    )
    try:
        js = nc.jetstream()
        # Ordered consumer on LOOM_RES (the stream named: looking it up by subject is not allowed).
        results = await js.subscribe(
            "loom.res.embed", stream="LOOM_RES", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        request_id = f"pub-{uuid.uuid4().hex[:12]}"
        req = gateway_pb2.PredictRequest(request_id=request_id)
        req.inputs["text"].text = "The match ended in a draw after extra time."
        ack = await js.publish("loom.req.embed", req.SerializeToString(), headers={"Nats-Msg-Id": request_id})
        assert ack.stream == "LOOM_REQ"
        async with asyncio.timeout(60):
            while True:
                result = gateway_pb2.Result.FromString((await results.next_msg(timeout=60)).data)
                if result.request_id == request_id:
                    break
        assert result.state == gateway_pb2.Result.DONE, result
        assert len(result.response.outputs["text"].text.embedding) == 384
        assert not refusals
    finally:
        await nc.close()


def test_passwords_are_fresh_and_parse_as_strings() -> None:
    a, b = new_passwords(), new_passwords()
    assert set(a) == {"admin", *SERVICES, "publisher"} and all(a[u] != b[u] for u in a)
    assert all(p[0].isalpha() for p in a.values())  # nats-server reads "12ab..." as a number
