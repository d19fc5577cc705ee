"""The admin API on a real mesh: the seeded registry, model details, bad input refused, a version registered.

The mesh is this module's own, on a temporary copy of the Triton repository, because
registering, loading and retiring versions changes the repository and what Triton serves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.launch.mesh import Mesh, free_ports
from services.common.pb.loom.v1 import admin_pb2 as pb
from services.common.pb.loom.v1 import admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.support import (
    TEST_API_KEY,
    bearer,
    copy_model_repository,
    eventually,
    grpc_auth,
    http_json,
    predict_http,
)

pytestmark = pytest.mark.integration

#: The actor of every entry: the id of the mesh's admin key (TEST_API_KEY is its LOOM_DEV_API_KEY).
ACTOR = "dev"
#: The name callers once gave themselves in x-loom-actor; the gateway now ignores it.
CLAIMED = "tester@admin-api"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="loom-admin-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def repository(workdir: Path) -> Path:
    return copy_model_repository(workdir / "triton")


@pytest.fixture(scope="module")
def admin_mesh(request: pytest.FixtureRequest, repository: Path) -> Iterator[Mesh]:
    m = Mesh(
        model_repository=repository,
        ports=free_ports(),
        env={"LOOM_GATEWAY_MODEL_REPOSITORY": str(repository)},
        api_key=TEST_API_KEY,
    )
    violations: list[str] = []
    try:
        m.start(timeout=240)
        yield m
        violations = m.permission_violations()  # e.g. the monitor's audit of its own admin routes
    finally:
        failed = request.session.testsfailed > 0 or bool(violations)
        m.stop(remove_workdir=not failed)
        if failed:
            print(f"\nadmin mesh logs kept in {m.workdir / 'logs'}")
    assert not violations, "nats-server refused these (deploy/nats/loom.conf):\n" + "\n".join(violations[:30])


# --- clients ------------------------------------------------------------------------------------


def call(mesh: Mesh, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        f"{mesh.gateway_http}/v1/admin{path}",
        data=data,
        method=method,
        headers={"content-type": "application/json", "x-loom-actor": CLAIMED, **bearer()},
    )
    try:
        with urllib.request.urlopen(req, timeout=180) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def rpc(mesh: Mesh, method: str, request: Any) -> Any:
    with grpc.insecure_channel(mesh.gateway_grpc) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return getattr(stub, method)(request, timeout=180, metadata=(("x-loom-actor", CLAIMED), *grpc_auth()))


def refused_http(mesh: Mesh, method: str, path: str, body: Any, status: int, code: str, needle: str) -> None:
    got, reply = call(mesh, method, path, body)
    assert (got, reply["error"]["code"]) == (status, code), reply
    assert needle in reply["error"]["message"], reply


def refused_grpc(mesh: Mesh, method: str, request: Any, code: grpc.StatusCode, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        rpc(mesh, method, request)
    assert err.value.code() == code, err.value.details()
    assert needle in (err.value.details() or ""), err.value.details()


def record(mesh: Mesh, model: str = "minilm") -> dict[str, Any]:
    status, rec = call(mesh, "GET", f"/models/{model}")
    assert status == 200, rec
    return dict(rec)


def triton_ready(mesh: Mesh, model: str, version: str) -> bool:
    url = f"http://127.0.0.1:{mesh.ports['triton_http']}/v2/models/{model}/versions/{version}/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


def version_for(mesh: Mesh, key: str, *, grpc_too: bool = False) -> str:
    """The minilm version that answered a request sent with route key ``key`` (over gRPC or HTTP)."""
    if grpc_too:
        with grpc.insecure_channel(mesh.gateway_grpc) as channel:
            req = gateway_pb2.PredictRequest(pipeline="embed")
            req.inputs["text"].text = "sticky routing"
            answer = gateway_pb2_grpc.GatewayStub(channel).Predict(
                req, timeout=30, metadata=(("x-loom-route-key", key), *grpc_auth())
            )
            return str(answer.outputs["text"].text.model_version)
    body = json.dumps({"inputs": {"text": "sticky routing"}}).encode()
    request = urllib.request.Request(
        f"{mesh.gateway_http}/v1/pipelines/embed:predict",
        data=body,
        headers={"content-type": "application/json", "x-loom-route-key": key, **bearer()},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return str(json.loads(resp.read())["outputs"]["text"]["model_version"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the seeded registry ------------------------------------------------------------------------


def test_minilm_is_seeded_with_its_lowest_version_stable(admin_mesh: Mesh) -> None:
    status, body = call(admin_mesh, "GET", "/models")
    assert status == 200
    models = {r["name"]: r for r in body["models"]}
    minilm = models["minilm"]
    assert minilm["policy"]["stable"] == "1" and minilm["policy"]["canary"] is None
    assert list(minilm["versions"]) == ["1"]  # only the lowest version with metadata; 2 waits to be registered
    assert minilm["versions"]["1"]["semver"] == "1.0.0" and minilm["versions"]["1"]["state"] == "active"
    audit = call(admin_mesh, "GET", "/audit?model=minilm")[1]["entries"]
    assert any(e["action"] == "model.register" and e["details"].get("seeded") for e in audit)


def test_models_show_has_metadata_and_sha256_over_http_and_grpc(admin_mesh: Mesh, repository: Path) -> None:
    rec = record(admin_mesh)
    v1 = rec["versions"]["1"]
    assert v1["training_data"] and v1["metrics"] and v1["created_by"]
    assert v1["source"] == str(repository / "minilm" / "1")
    assert v1["artifacts"]["model.py"] == sha256(repository / "minilm" / "1" / "model.py")
    assert all(len(d) == 64 for d in v1["artifacts"].values()) and len(v1["artifacts"]) >= 2  # the packaged ONNX too

    msg = rpc(admin_mesh, "GetModel", pb.GetModelRequest(model="minilm"))
    assert msg.policy.stable == "1"
    assert dict(msg.versions["1"].artifacts) == v1["artifacts"]
    assert msg.versions["1"].semver == "1.0.0" and msg.versions["1"].training_data == v1["training_data"]
    assert dict(msg.versions["1"].metrics) == pytest.approx(v1["metrics"])
    assert [m.name for m in rpc(admin_mesh, "ListModels", pb.ListModelsRequest()).models] == [
        r["name"] for r in call(admin_mesh, "GET", "/models")[1]["models"]
    ]


# --- bad admin input: a typed error on both transports, the registry unchanged ---------------------


def unchanged(mesh: Mesh, action: Callable[[], None]) -> None:
    before = record(mesh)
    action()
    assert record(mesh) == before


def test_unknown_model(admin_mesh: Mesh) -> None:
    def act() -> None:
        refused_http(admin_mesh, "GET", "/models/nope", None, 404, "NOT_FOUND", "'nope' is not registered")
        refused_http(admin_mesh, "PUT", "/models/nope/traffic", {"stable": "1"}, 404, "NOT_FOUND", "nope")
        refused_http(admin_mesh, "POST", "/models/nope/rollout", {"version": "2"}, 404, "NOT_FOUND", "nope")
        refused_grpc(admin_mesh, "GetModel", pb.GetModelRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "nope")
        refused_grpc(admin_mesh, "Rollback", pb.RollbackRequest(model="nope"), grpc.StatusCode.NOT_FOUND, "nope")

    unchanged(admin_mesh, act)


def test_unknown_version(admin_mesh: Mesh) -> None:
    policy = {"stable": "1", "canary": {"version": "9", "weight": 10}}

    def act() -> None:
        refused_http(admin_mesh, "PUT", "/models/minilm/traffic", policy, 404, "NOT_FOUND", "no version '9'")
        refused_http(admin_mesh, "DELETE", "/models/minilm/versions/9", None, 404, "NOT_FOUND", "no version '9'")
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", {"version": "9"}, 404, "NOT_FOUND", "'9'")
        msg = pb.SetTrafficRequest(model="minilm", policy=pb.TrafficPolicy(stable="1", canary=pb.Canary(version="9")))
        refused_grpc(admin_mesh, "SetTraffic", msg, grpc.StatusCode.NOT_FOUND, "no version '9'")
        msg2 = pb.StartRolloutRequest(model="minilm", version="9")
        refused_grpc(admin_mesh, "StartRollout", msg2, grpc.StatusCode.NOT_FOUND, "no version '9'")

    unchanged(admin_mesh, act)


def test_weights_outside_0_to_100(admin_mesh: Mesh) -> None:
    def act() -> None:
        for weight in (150, -5):
            policy = {"stable": "1", "canary": {"version": "2", "weight": weight}}
            refused_http(admin_mesh, "PUT", "/models/minilm/traffic", policy, 400, "INVALID_ARGUMENT", "canary.weight")
        rollout = {"version": "2", "steps": [{"weight": 10}, {"weight": 120}]}
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", rollout, 400, "INVALID_ARGUMENT", "steps[1]")
        canary = pb.Canary(version="2", weight=150)
        msg = pb.SetTrafficRequest(model="minilm", policy=pb.TrafficPolicy(stable="1", canary=canary))
        refused_grpc(admin_mesh, "SetTraffic", msg, grpc.StatusCode.INVALID_ARGUMENT, "canary.weight")
        steps = [pb.RolloutStep(weight=10), pb.RolloutStep(weight=101)]
        msg2 = pb.StartRolloutRequest(model="minilm", version="2", steps=steps)
        refused_grpc(admin_mesh, "StartRollout", msg2, grpc.StatusCode.INVALID_ARGUMENT, "steps[1]")

    unchanged(admin_mesh, act)


def test_malformed_bodies(admin_mesh: Mesh) -> None:
    def act() -> None:
        got, reply = call(admin_mesh, "PUT", "/models/minilm/traffic", raw=b"{not json")
        assert got == 400 and reply["error"] == {"code": "INVALID_ARGUMENT", "message": "the body is not valid JSON"}
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", [1], 400, "INVALID_ARGUMENT", "JSON object")
        body = {"version": "2", "surprise": 1}
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", body, 400, "INVALID_ARGUMENT", "surprise")
        refused_http(admin_mesh, "POST", "/models/minilm/versions", {}, 400, "INVALID_ARGUMENT", "source")
        refused_http(admin_mesh, "GET", "/audit?limit=lots", None, 400, "INVALID_ARGUMENT", "limit")

    unchanged(admin_mesh, act)


def test_rollout_of_the_stable_version(admin_mesh: Mesh) -> None:
    def act() -> None:
        needle = "already stable"
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", {"version": "1"}, 412, "FAILED_PRECONDITION", needle)
        msg = pb.StartRolloutRequest(model="minilm", version="1")
        refused_grpc(admin_mesh, "StartRollout", msg, grpc.StatusCode.FAILED_PRECONDITION, needle)

    unchanged(admin_mesh, act)


def test_retire_of_the_stable_version(admin_mesh: Mesh) -> None:
    def act() -> None:
        needle = "stable version"
        refused_http(admin_mesh, "DELETE", "/models/minilm/versions/1", None, 412, "FAILED_PRECONDITION", needle)
        msg = pb.RetireVersionRequest(model="minilm", version="1")
        refused_grpc(admin_mesh, "RetireVersion", msg, grpc.StatusCode.FAILED_PRECONDITION, needle)

    unchanged(admin_mesh, act)
    assert triton_ready(admin_mesh, "minilm", "1")


def test_malformed_metadata_is_refused_and_nothing_is_copied(admin_mesh: Mesh, repository: Path, workdir: Path) -> None:
    folder = workdir / "staging" / "bad" / "5"
    folder.mkdir(parents=True)
    shutil.copy2(repository / "minilm" / "1" / "model.py", folder / "model.py")
    (folder / "metadata.yaml").write_text("semver: [not, a, version\nnotes: broken\n")

    def act() -> None:
        body = {"source": str(folder)}
        refused_http(admin_mesh, "POST", "/models/minilm/versions", body, 400, "INVALID_ARGUMENT", "metadata.yaml")
        msg = pb.RegisterVersionRequest(model="minilm", source=str(folder))
        refused_grpc(admin_mesh, "RegisterVersion", msg, grpc.StatusCode.INVALID_ARGUMENT, "metadata.yaml")

    unchanged(admin_mesh, act)
    assert not (repository / "minilm" / "5").exists()
    entries = call(admin_mesh, "GET", "/audit?model=minilm&limit=20")[1]["entries"]
    refused = [e for e in entries if e["action"] == "model.register" and e["result"] == "refused"]
    assert refused and refused[-1]["actor"] == ACTOR and "metadata.yaml" in refused[-1]["details"]["error"]


def test_refusals_are_audited_with_the_actor(admin_mesh: Mesh) -> None:
    refused_http(admin_mesh, "POST", "/models/minilm/rollout", {"version": "1"}, 412, "FAILED_PRECONDITION", "stable")
    reply = rpc(admin_mesh, "ListAudit", pb.ListAuditRequest(model="minilm", limit=5))
    last = reply.entries[-1]
    assert (last.action, last.target, last.result, last.actor) == ("rollout.start", "minilm/1", "refused", ACTOR)
    details = json.loads(last.details_json)
    assert "already stable" in details["error"] and details["tenant"] == "dev"  # x-loom-actor is not believed
    assert all(e.target == "minilm" or e.target.startswith("minilm/") for e in reply.entries)


def newest(mesh: Mesh, action: str, limit: int = 50) -> dict[str, Any]:
    """The newest audit entry of ``action`` (any target)."""
    status, doc = call(mesh, "GET", f"/audit?limit={limit}")
    assert status == 200, doc
    mine = [e for e in doc["entries"] if e["action"] == action]
    assert mine, [e["action"] for e in doc["entries"]]
    return dict(mine[-1])


def test_admin_actions_say_where_they_came_from_on_both_transports(admin_mesh: Mesh) -> None:
    # HTTP: a refused traffic change (weights outside 0..100); gRPC: a refused pause (no rollout).
    policy = {"stable": "1", "canary": {"version": "2", "weight": 150}}
    refused_http(admin_mesh, "PUT", "/models/minilm/traffic", policy, 400, "INVALID_ARGUMENT", "canary.weight")
    over_http = newest(admin_mesh, "traffic.set")
    with pytest.raises(grpc.RpcError):
        rpc(admin_mesh, "PauseRollout", pb.RolloutActionRequest(model="minilm"))
    reply = rpc(admin_mesh, "ListAudit", pb.ListAuditRequest(model="minilm", limit=5))
    over_grpc = [e for e in reply.entries if e.action == "rollout.pause"][-1]
    assert (over_http["source"], over_http["actor"], over_http["result"]) == ("127.0.0.1", ACTOR, "refused")
    assert (over_grpc.source, over_grpc.actor, over_grpc.result) == ("127.0.0.1", ACTOR, "refused")


def test_a_pipeline_put_is_an_audited_admin_action(admin_mesh: Mesh) -> None:
    url = f"{admin_mesh.gateway_http}/v1/pipelines/embed"
    status, spec = http_json(url)
    assert status == 200, spec
    status, stored = http_json(url, spec, method="PUT")
    assert status == 200, stored
    entry = newest(admin_mesh, "pipeline.put")
    assert (entry["target"], entry["result"], entry["actor"], entry["source"]) == ("embed", "ok", ACTOR, "127.0.0.1")
    assert entry["details"]["revision"] == stored["revision"] and entry["details"]["tenant"] == "dev"
    status, _ = http_json(url, raw=b"name: [not a spec", method="PUT")
    assert status == 400
    refused = newest(admin_mesh, "pipeline.put")
    assert (refused["target"], refused["result"]) == ("embed", "refused") and refused["details"]["error"]


def test_the_monitors_admin_routes_are_audited(admin_mesh: Mesh) -> None:
    base = admin_mesh.monitor_http
    assert http_json(f"{base}/v1/drift/baseline", {"action": "capture", "pipeline": "embed"})[0] == 202
    assert http_json(f"{base}/v1/drift/baseline", {"action": "forget"})[0] == 400
    assert http_json(f"{base}/v1/evaluate", {}, method="POST")[0] == 200

    def landed() -> bool:
        actions = [e["action"] for e in call(admin_mesh, "GET", "/audit?limit=50")[1]["entries"]]
        return {"monitor.baseline.capture", "monitor.baseline", "monitor.evaluate"} <= set(actions)

    eventually(landed, 10)
    capture, refused, evaluate = (
        newest(admin_mesh, a) for a in ("monitor.baseline.capture", "monitor.baseline", "monitor.evaluate")
    )
    assert (capture["service"], capture["target"], capture["result"]) == ("monitor", "drift/embed", "ok")
    assert (refused["result"], refused["target"]) == ("refused", "drift/*") and "capture" in refused["details"]["error"]
    assert (evaluate["service"], evaluate["result"], evaluate["actor"]) == ("monitor", "ok", ACTOR)
    assert {capture["source"], refused["source"], evaluate["source"]} == {"127.0.0.1"}


def test_a_version_triton_cannot_load_is_removed_and_not_registered(
    admin_mesh: Mesh, repository: Path, workdir: Path
) -> None:
    folder = workdir / "staging" / "broken" / "6"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text('raise RuntimeError("this version is broken on purpose")\n')
    (folder / "metadata.yaml").write_text("semver: 6.0.0\nnotes: cannot load\n")

    def act() -> None:
        got, reply = call(admin_mesh, "POST", "/models/minilm/versions", {"source": str(folder)})
        assert got >= 400 and reply["error"]["message"], reply

    unchanged(admin_mesh, act)
    assert not (repository / "minilm" / "6").exists()  # the copy is gone again
    assert not triton_ready(admin_mesh, "minilm", "6")
    eventually(lambda: triton_ready(admin_mesh, "minilm", "1"), timeout=30)  # the stable version still serves
    entries = call(admin_mesh, "GET", "/audit?model=minilm&limit=5")[1]["entries"]
    failed = [e for e in entries if e["target"] == "minilm/6"]
    assert failed and failed[-1]["result"] == "failed" and failed[-1]["details"]["error"]


def test_a_route_key_too_long_is_refused_on_both_transports(admin_mesh: Mesh) -> None:
    key = "k" * 300
    req = urllib.request.Request(
        f"{admin_mesh.gateway_http}/v1/pipelines/embed:predict",
        data=json.dumps({"inputs": {"text": "hi"}}).encode(),
        headers={"content-type": "application/json", "x-loom-route-key": key, **bearer()},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "route key" in json.loads(err.value.read())["error"]["message"]
    with grpc.insecure_channel(admin_mesh.gateway_grpc) as channel:
        msg = gateway_pb2.PredictRequest(pipeline="embed")
        msg.inputs["text"].text = "hi"
        with pytest.raises(grpc.RpcError) as rpc_err:
            gateway_pb2_grpc.GatewayStub(channel).Predict(
                msg, timeout=30, metadata=(("x-loom-route-key", key), *grpc_auth())
            )
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "route key" in (rpc_err.value.details() or "")
    assert version_for(admin_mesh, "user-1") == "1"  # no canary: every key meets stable


# --- a real new version -------------------------------------------------------------------------


def new_version_source(repository: Path, workdir: Path) -> Path:
    """Version 2 as shipped when its ONNX export exists (registered in place), else a copy of version 1."""
    shipped = repository / "minilm" / "2"
    if (shipped / "model.onnx").exists() and (shipped / "metadata.yaml").exists():
        return shipped
    shutil.rmtree(shipped, ignore_errors=True)
    staged = workdir / "staging" / "minilm" / "2"
    shutil.copytree(repository / "minilm" / "1", staged, ignore=shutil.ignore_patterns("__pycache__"))
    text = (staged / "metadata.yaml").read_text().replace("semver: 1.0.0", "semver: 2.0.0-copy")
    (staged / "metadata.yaml").write_text(text)
    return staged


def test_register_a_new_version_loads_it_and_its_lifecycle_holds(
    admin_mesh: Mesh, repository: Path, workdir: Path
) -> None:
    source = new_version_source(repository, workdir)
    assert not triton_ready(admin_mesh, "minilm", "2")
    status, rec = call(admin_mesh, "POST", "/models/minilm/versions", {"source": str(source), "notes": "admin test"})
    assert status == 201, rec
    v2 = rec["versions"]["2"]
    assert v2["state"] == "active" and v2["notes"] == "admin test" and rec["policy"]["stable"] == "1"
    assert (repository / "minilm" / "2" / "metadata.yaml").is_file()
    assert triton_ready(admin_mesh, "minilm", "2") and triton_ready(admin_mesh, "minilm", "1")

    # Registering it again is refused; the registry keeps the first registration.
    refused_http(admin_mesh, "POST", "/models/minilm/versions", {"source": str(source)}, 409, "ALREADY_EXISTS", "2")

    # All traffic to the canary: answers come from version 2 (the sticky key is only carried here).
    status, rec = call(
        admin_mesh, "PUT", "/models/minilm/traffic", {"stable": "1", "canary": {"version": "2", "weight": 100}}
    )
    assert status == 200, rec

    def served_by_2() -> bool:
        code, answer = predict_http(admin_mesh.gateway_http, "canary check")
        return code == 200 and answer["outputs"]["text"]["model_version"] == "2"

    eventually(served_by_2, timeout=20)

    # Half the keys to the canary: one key always meets one version, over HTTP and gRPC alike.
    status, rec = call(
        admin_mesh, "PUT", "/models/minilm/traffic", {"stable": "1", "canary": {"version": "2", "weight": 50}}
    )
    assert status == 200, rec

    def sticky() -> bool:
        keys = [f"user-{i}" for i in range(16)]
        seen = {k: {version_for(admin_mesh, k, grpc_too=j == 1) for j in range(3)} for k in keys}
        assert all(len(versions) == 1 for versions in seen.values()), seen
        assert set.union(*seen.values()) == {"1", "2"}, seen
        return True

    eventually(sticky, timeout=30)  # the inference service follows the registry by a watch
    status, rec = call(admin_mesh, "POST", "/models/minilm:rollback", {"reason": "test"})
    assert status == 200 and rec["policy"]["canary"] is None

    # A rollout runs; a second one, and retiring its version, are refused until it is aborted.
    status, rollout = call(admin_mesh, "POST", "/models/minilm/rollout", {"version": "2"})
    assert status == 201 and rollout["state"] == "running" and rollout["started_by"] == ACTOR
    assert [s["weight"] for s in rollout["steps"]] == [10, 50, 100]

    def act() -> None:
        busy = f"rollout {rollout['id']} of version 2 is running"
        refused_http(admin_mesh, "POST", "/models/minilm/rollout", {"version": "2"}, 412, "FAILED_PRECONDITION", busy)
        msg = pb.StartRolloutRequest(model="minilm", version="2")
        refused_grpc(admin_mesh, "StartRollout", msg, grpc.StatusCode.FAILED_PRECONDITION, busy)
        refused_http(admin_mesh, "DELETE", "/models/minilm/versions/2", None, 412, "FAILED_PRECONDITION", "abort")
        refused_http(admin_mesh, "PUT", "/models/minilm/traffic", {"stable": "1"}, 412, "FAILED_PRECONDITION", "abort")

    unchanged(admin_mesh, act)
    status, rollout = call(admin_mesh, "GET", "/models/minilm/rollout")
    assert status == 200 and rollout["current"]["state"] == "running"
    aborted = rpc(admin_mesh, "AbortRollout", pb.RolloutActionRequest(model="minilm", reason="test over"))
    assert aborted.state == "aborted" and aborted.reason == "test over"
    assert record(admin_mesh)["policy"]["canary"] is None

    # Retired: Triton unloads it, version 1 keeps serving.
    msg = rpc(admin_mesh, "RetireVersion", pb.RetireVersionRequest(model="minilm", version="2"))
    assert msg.versions["2"].state == "retired"
    assert not triton_ready(admin_mesh, "minilm", "2") and triton_ready(admin_mesh, "minilm", "1")
    actions = [
        (e["action"], e["result"]) for e in call(admin_mesh, "GET", "/audit?model=minilm&limit=30")[1]["entries"]
    ]
    for done in ("model.register", "traffic.set", "model.rollback", "rollout.start", "rollout.abort", "model.retire"):
        assert (done, "ok") in actions
