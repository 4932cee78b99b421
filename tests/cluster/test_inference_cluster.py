"""Inference end to end on real peers: planning, loading, routing, failover, bad input, and an
official client (tritonclient) that nobody here wrote."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redge.agent import oip
from redge.agent.client import Client, RequestRejected
from redge.chaos.cluster import LocalCluster, http_json, wait_until
from redge.chaos.observe import primary_of, replicas_loaded
from redge.runtime.testing import IN_FEATURES, write_family

pytestmark = pytest.mark.cluster

DETECTOR = {"name": "det", "variants": ["mlp-large", "mlp-small"], "priority": "critical", "slo_ms": 200, "backup": "warm"}
TAGGER = {"name": "tag", "variants": ["mlp-medium", "mlp-small"], "priority": "standard", "slo_ms": 200, "backup": "cold"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("source")
    write_family(directory, formats=("onnx", "safetensors"))
    return directory


def events(cluster: LocalCluster, via: str) -> list[dict]:
    status, body = http_json("GET", cluster.peers[via].url + "/cluster/events?limit=2000", timeout_s=5)
    return body["events"] if status == 200 else []


def serving_everywhere(cluster: LocalCluster, via: str, apps: list[str]) -> bool:
    return replicas_loaded(cluster, via, apps)


@pytest.fixture
def serving_cluster(source):
    with LocalCluster(size=3, extra_args=["--source", str(source)]) as cluster:
        leader = cluster.wait_leader()
        for app in (DETECTOR, TAGGER):
            status, body = cluster.register_app(leader, app)
            assert status == 200, body
        wait_until(lambda: serving_everywhere(cluster, leader, ["det", "tag"]), 120, interval_s=0.1,
                   what="apps loaded and serving")
        yield cluster


def infer_http(url: str, app: str, inputs: dict, binary: bool = True) -> tuple[int, dict, dict]:
    body, headers = oip.encode_infer_request(inputs, binary=binary)
    request = urllib.request.Request(f"{url}/v2/models/{app}/infer", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            header, arrays = oip.decode_infer_response(response.read(), response.headers.get(oip.HEADER_LENGTH))
            return response.status, header, arrays
    except urllib.error.HTTPError as error:
        import json

        return error.code, json.loads(error.read() or b"{}"), {}


def test_any_peer_serves_any_app_and_says_who_served(serving_cluster):
    cluster = serving_cluster
    primary = primary_of(cluster, "n1", "det")
    x = np.random.default_rng(0).standard_normal((2, IN_FEATURES)).astype(np.float32)
    answers = []
    for peer in cluster.peers.values():
        for binary in (True, False):
            status, header, arrays = infer_http(peer.url, "det", {"input": x}, binary=binary)
            assert status == 200, header
            assert header["parameters"]["node_id"] == primary
            assert header["parameters"]["epoch"] >= 1
            answers.append(arrays["output"])
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], rtol=1e-5)
    assert answers[0].shape == (2, 4)


def test_responses_say_where_the_time_went(serving_cluster):
    """Server-Timing: the serving peer's parts (read, parse, queue, model, hop, total), and a
    forwarding peer's whole hop after them."""
    from redge.agent.dataplane import parse_server_timing

    cluster = serving_cluster
    primary = primary_of(cluster, "n1", "det")
    other = next(node for node in cluster.peers if node != primary)
    body, headers = oip.encode_infer_request({"input": np.ones((1, IN_FEATURES), np.float32)})
    timings = {}
    for node in (primary, other):
        request = urllib.request.Request(f"{cluster.peers[node].url}/v2/models/det/infer", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and response.headers["X-Redge-Node"] == primary
            timings[node] = parse_server_timing(response.headers["Server-Timing"])
    served = timings[primary]
    assert {"read", "parse", "queue", "model", "hop", "total"} <= served.keys() and "forward" not in served
    assert served["total"] >= served["model"] + served["queue"] + served["hop"]
    assert timings[other]["forward"] >= timings[other]["total"] > 0


def test_bad_input_gets_4xx_and_the_peer_keeps_serving(serving_cluster):
    cluster = serving_cluster
    url = cluster.peers["n2"].url
    cases = [
        ({"input": np.zeros((1, IN_FEATURES + 1), np.float32)}, 400, "shape"),
        ({"input": np.zeros((1, IN_FEATURES), np.int64)}, 400, "datatype"),
        ({"nope": np.zeros((1, IN_FEATURES), np.float32)}, 400, "nope"),
    ]
    for inputs, status_expected, word in cases:
        status, body, _ = infer_http(url, "det", inputs)
        assert status == status_expected and word in body["error"], body
    status, body, _ = infer_http(url, "unknown-app", {"input": np.zeros((1, IN_FEATURES), np.float32)})
    assert status == 404 and "unknown app" in body["error"]
    for raw, headers in [
        (b"{not json", {"Content-Type": "application/json"}),
        (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}}]}',
         {oip.HEADER_LENGTH: "5000"}),
    ]:
        request = urllib.request.Request(f"{url}/v2/models/det/infer", data=raw, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 400
    huge = b"0" * (70 * 1024 * 1024)
    request = urllib.request.Request(f"{url}/v2/models/det/infer", data=huge, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a body over the limit was accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 413
    except (ConnectionError, urllib.error.URLError):
        pass  # the server may close the connection on an oversized body: also a refusal
    status, _, arrays = infer_http(url, "det", {"input": np.ones((1, IN_FEATURES), np.float32)})
    assert status == 200 and arrays["output"].shape == (1, 4)
    with Client([url]) as client, pytest.raises(RequestRejected):
        client.infer("det", {"input": np.zeros((1, 3), np.float32)})


def test_primary_crash_warm_backup_serves_under_next_epoch_and_client_never_fails(serving_cluster):
    cluster = serving_cluster
    primary = primary_of(cluster, "n1", "det")
    epoch_before = cluster.peers["n1"].snapshot()["epoch"]
    other = next(n for n in cluster.peers if n != primary)
    x = np.ones((1, IN_FEATURES), np.float32)
    results, errors = [], []
    with Client([cluster.peers[other].url], attempt_timeout_s=0.5, deadline_s=5.0) as client:
        for _ in range(20):
            results.append(client.infer("det", {"input": x}))
        cluster.peers[primary].kill()
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 3.0:
            try:
                results.append(client.infer("det", {"input": x}))
            except Exception as error:  # noqa: BLE001 - a failed request is what the test counts
                errors.append(error)
    assert not errors, errors[:3]
    after = results[20:]
    assert after and all(r.node_id != primary for r in after)
    survivors = [n for n in cluster.peers if n != primary]
    new_primary = wait_until(lambda: primary_of(cluster, survivors[0], "det") not in (None, primary) and primary_of(cluster, survivors[0], "det"), 10)
    snapshot = cluster.peers[survivors[0]].snapshot()
    assert snapshot["epoch"] > epoch_before
    kinds = [e["kind"] for e in events(cluster, survivors[0])]
    assert "failure_confirmed" in kinds
    # The promotion was a flag flip on the warm backup, not a load.
    promoted = [e for e in events(cluster, survivors[0]) if e["kind"] == "serving" and e.get("node") == new_primary and e.get("detail") == "promoted"]
    assert promoted, "the warm backup was not promoted in place"
    assert all(r.epoch is not None for r in after)
    # Reported once per epoch: a reconciler that keeps reporting floods the replicated log.
    reports = [(e["node"], e["app"], e["epoch"]) for e in events(cluster, survivors[0]) if e["kind"] == "serving"]
    assert len(reports) == len(set(reports)), sorted(reports)


def test_leader_that_is_also_the_primary_dies_and_the_new_leader_fails_over(serving_cluster):
    cluster = serving_cluster
    # The leader's own node is the victim: losing it loses the planner too, and it hosts
    # replicas (three apps' replicas on three nodes), so its failure needs a failover.
    victim = cluster.wait_leader()
    cluster.peers[victim].kill()
    survivors = [n for n in cluster.peers if n != victim]
    new_leader = cluster.wait_leader(survivors, timeout_s=10, not_node=victim)
    assert new_leader in survivors

    def recovered() -> bool:
        snapshot = cluster.peers[new_leader].snapshot()
        for app in ("det", "tag"):
            replicas = snapshot["plan"].get(app, [])
            if any(r["node_id"] == victim for r in replicas):
                return False
            if not any(r["role"] == "primary" for r in replicas):
                return False
        return True

    wait_until(recovered, 20, interval_s=0.05, what="the new leader's plan without the dead node")
    status, header, _ = infer_http(cluster.peers[survivors[0]].url, "det", {"input": np.ones((1, IN_FEATURES), np.float32)})
    assert status == 200 and header["parameters"]["node_id"] != victim


def test_tritonclient_works_unmodified(serving_cluster):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    client = tritonclient_http.InferenceServerClient(url=serving_cluster.peers["n3"].url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "redge"
    assert client.is_model_ready("det")
    metadata = client.get_model_metadata("det")
    assert metadata["inputs"][0]["name"] == "input" and metadata["inputs"][0]["datatype"] == "FP32"
    x = np.random.default_rng(1).standard_normal((3, IN_FEATURES)).astype(np.float32)
    for binary in (True, False):
        inputs = [tritonclient_http.InferInput("input", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, binary_data=binary)
        outputs = [tritonclient_http.InferRequestedOutput("output", binary_data=binary)]
        result = client.infer("det", inputs, outputs=outputs)
        assert result.as_numpy("output").shape == (3, 4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
)
fuzzed_inputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["input", "x", ""]), "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "FP8"]),
         "shape": st.lists(st.integers(-1, 20), max_size=3), "data": json_values},
        optional={"parameters": st.dictionaries(st.sampled_from(["binary_data_size"]), st.integers(-1, 128))},
    ),
    max_size=3,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(inputs=fuzzed_inputs, trailing=st.binary(max_size=64), header_length=st.booleans())
def test_fuzzed_infer_requests_get_4xx_and_the_peer_keeps_serving(serving_cluster, inputs, trailing, header_length):
    import json

    url = serving_cluster.peers["n1"].url
    header = json.dumps({"inputs": inputs}).encode()
    headers = {oip.HEADER_LENGTH: str(len(header))} if header_length else {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/v2/models/det/infer", data=header + trailing, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200  # a fuzzed request can be valid by chance
    except urllib.error.HTTPError as error:
        assert 400 <= error.code < 500, (error.code, error.read()[:300])
        assert "error" in json.loads(error.read() or b"{}")
    status, _, arrays = infer_http(url, "det", {"input": np.ones((1, IN_FEATURES), np.float32)})
    assert status == 200 and arrays["output"].shape == (1, 4)
