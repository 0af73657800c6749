"""engine.ray_address: the run joins a Ray cluster that is already running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from helpers import read_metrics, run_experiment, timeless_records
from ray.cluster_utils import Cluster

from simulator import backends
from simulator.backends import ClientFailure

pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).parent / "ray")
PROBE = ["rounds=2", "engine.backend=ray", "client.method=cluster_probe_client.OnlyInTheTestCluster"]


def _cluster_status(address: str) -> subprocess.CompletedProcess:
    """``ray status``, asked again while it says the cluster's status is not ready yet (a loaded host)."""
    deadline = time.monotonic() + 60
    while True:
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60)
        if "CPU" in status.stdout or time.monotonic() > deadline:
            assert "CPU" in status.stdout, status.stdout + status.stderr
            return status
        time.sleep(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_cluster(monkeypatch, user_code):
    """A head node started outside this process, as a user's cluster would be.

    Its worker processes, and only they, carry FEDSTREAM_TEST_CLUSTER=1.
    """
    monkeypatch.delenv("FEDSTREAM_TEST_CLUSTER", raising=False)
    port = _free_port()
    env = {**os.environ, "FEDSTREAM_TEST_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_a_run_with_ray_address_trains_in_the_running_cluster_and_leaves_it_up(tmp_path, running_cluster):
    summary = run_experiment(tmp_path / "joined", [*PROBE, f"engine.ray_address={running_cluster}"])
    assert summary["rounds"] == 2 and len(read_metrics(tmp_path / "joined")) == 2
    assert not ray.is_initialized()  # the driver disconnected...
    assert _cluster_status(running_cluster).returncode == 0  # ...and the cluster is still up
    # Without the address the run starts its own Ray, where the probe client fails.
    with pytest.raises(ClientFailure, match="outside the test cluster"):
        run_experiment(tmp_path / "own", PROBE)


def test_a_two_node_cluster_spreads_the_actors_sends_the_data_to_each_node_once_and_keeps_the_numbers(
    tmp_path, monkeypatch
):
    locations: list[dict] = []
    close = backends.RayBackend.close

    def close_after_looking(self, failed=False):  # where the data is, before the run lets go of it
        locations.append(ray.experimental.get_object_locations([self.data_ref])[self.data_ref])
        close(self, failed)

    monkeypatch.setattr(backends.RayBackend, "close", close_after_looking)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)  # a second machine: one CPU each, so one actor each
    try:
        cluster.wait_for_nodes()
        common = ["rounds=3", "eval.probes=false"]
        run_experiment(tmp_path / "local", [*common, "engine.backend=local"])
        run_experiment(
            tmp_path / "cluster",
            [*common, "engine.backend=ray", "engine.num_actors=2", f"engine.ray_address={cluster.address}"],
            keep_warm=True,
        )
        nodes = {s["node"] for s in ray.get([a.stats.remote() for a in backends._WARM.pool.actors])}
        assert len(nodes) == 2  # one actor on each node
        (where,) = locations
        assert len(set(where["node_ids"])) == 2 and len(where["node_ids"]) == 2  # one copy per node
        assert timeless_records(tmp_path / "cluster") == timeless_records(tmp_path / "local")
    finally:
        backends._WARM.release()
        cluster.shutdown()
