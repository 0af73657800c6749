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

from conftest import ROOT, read_metrics, run_experiment
from simulator.backends import ClientFailure

pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).parent / "ray")
USER_CODE = ROOT / "tests" / "user_code"
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
def running_cluster(monkeypatch):
    """A head node started outside this process, as a user's cluster would be.

    Its worker processes, and only they, carry FEDSTREAM_TEST_CLUSTER=1.
    """
    monkeypatch.syspath_prepend(str(USER_CODE))
    monkeypatch.setenv("PYTHONPATH", f"{USER_CODE}:{ROOT}")
    monkeypatch.delenv("FEDSTREAM_TEST_CLUSTER", raising=False)
    port = _free_port()
    env = {**os.environ, "FEDSTREAM_TEST_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        check=True, capture_output=True, env=env, timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_a_run_with_ray_address_trains_in_the_running_cluster_and_leaves_it_up(
    tmp_path, running_cluster
):
    summary = run_experiment(tmp_path / "joined", [*PROBE, f"engine.ray_address={running_cluster}"])
    assert summary["rounds"] == 2 and len(read_metrics(tmp_path / "joined")) == 2
    assert not ray.is_initialized()  # the driver disconnected...
    assert _cluster_status(running_cluster).returncode == 0  # ...and the cluster is still up
    # Without the address the run starts its own Ray, where the probe client fails.
    with pytest.raises(ClientFailure, match="outside the test cluster"):
        run_experiment(tmp_path / "own", PROBE)
