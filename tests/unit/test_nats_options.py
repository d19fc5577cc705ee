"""NATS login settings, inbox prefixes, redaction, and the provisioning plan (no server)."""

from __future__ import annotations

import pytest

from services.common.nats_options import NatsOptions, inbox_prefix, redact
from services.common.provision import plan
from services.common.settings import CommonSettings

pytestmark = pytest.mark.unit

PINGS = {"ping_interval": 5.0, "max_outstanding_pings": 3}


def test_options_come_from_the_loom_nats_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_NATS_USER", "fusion")
    monkeypatch.setenv("LOOM_NATS_PASSWORD", "psecret")
    opts = NatsOptions.from_settings(CommonSettings())
    assert opts.connect_kwargs() == {"user": "fusion", "password": "psecret"} | PINGS
    assert "psecret" not in repr(opts) and "psecret" not in repr(CommonSettings())
    creds = NatsOptions.from_settings(CommonSettings(nats_user="", nats_password="", nats_creds="/x.creds"))
    assert creds.connect_kwargs() == {"user_credentials": "/x.creds"} | PINGS
    with pytest.raises(ValueError, match="needs LOOM_NATS_USER"):
        NatsOptions.from_settings(CommonSettings(nats_user="", nats_password="p"))


def test_a_silent_server_is_left_after_the_configured_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_NATS_PING_INTERVAL_S", "2.5")
    monkeypatch.setenv("LOOM_NATS_MAX_OUTSTANDING_PINGS", "4")
    kwargs = NatsOptions.from_settings(CommonSettings()).connect_kwargs()
    assert (kwargs["ping_interval"], kwargs["max_outstanding_pings"]) == (2.5, 4)


def test_each_service_has_an_inbox_prefix_of_its_own() -> None:
    assert inbox_prefix("gateway") == "_INBOX.gateway"
    assert inbox_prefix("a.b>*") == "_INBOX.a_b__"  # never a wildcard or an extra token
    assert inbox_prefix("") == "_INBOX._"


def test_passwords_in_urls_are_redacted() -> None:
    servers = "nats://gateway:p123@nats-1:4222, nats://nats-2:4222,tls://u:p@h:1"
    assert redact(servers) == "nats://gateway:***@nats-1:4222,nats://nats-2:4222,tls://u:***@h:1"


def test_the_plan_lists_every_stream_and_bucket_with_the_replicas_asked_for() -> None:
    what = plan(CommonSettings(js_replicas=3, blob_ttl_s=60), cache_bucket="c", cache_ttl_s=5)
    assert set(what.names()) == {
        "LOOM_AUDIT",
        "LOOM_REQ",
        "LOOM_WORK",
        "LOOM_RES",
        "LOOM_DLQ",
        "KV_loom_pipelines",
        "KV_loom_models",
        "KV_c",
        "KV_loom_results",
        "KV_loom_fusion",
        "OBJ_loom_blobs",
    }
    assert {s.num_replicas for s in what.streams} == {3}
    assert {b.replicas for b in what.buckets} | {o.replicas for o in what.objects} == {3}
    assert what.objects[0].ttl == 60
    assert "KV_c" not in plan(CommonSettings(), cache_bucket="c", cache=False).names()
