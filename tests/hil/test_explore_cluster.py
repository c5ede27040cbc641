"""gemu explore --cluster: the same campaign on a Dask distributed scheduler with two workers
(dask-scheduler and dask-worker processes on 127.0.0.1, started and stopped here)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemu.host.explore import engine
from gemu.host.explore.scenario import ExploreConfig

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path):
    assert (BIN / "dask").exists(), (
        f"dask distributed is not installed in {BIN} (ci/setup.sh installs the dev extra)"
    )
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    log = open(tmp_path / "dask.log", "wb")  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    ]
    try:
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()


def test_cluster_campaign_matches_local(cluster):
    """A campaign sent to a Dask scheduler with two workers reports the same violating seeds,
    invariants and interleavings as the same seeds run in this process."""
    cfg = ExploreConfig(mutant="idle-read-fences-bookkeep")
    local = engine.run_campaign(cfg, 16, seed=0, workers=1, keep_going=True)
    remote = engine.run_campaign(cfg, 16, seed=0, cluster=cluster, keep_going=True)
    assert remote.workers == 2
    assert remote.verdicts() == local.verdicts() and local.verdicts()
    assert remote.interleavings == local.interleavings
    assert remote.schedules_run == 16


def test_cli_cluster_option(cluster):
    """``gemu explore --cluster ADDRESS`` runs the campaign there and reports it."""
    out = subprocess.run(
        [str(BIN / "gemu"), "explore", "small", "--schedules", "8", "--cluster", cluster],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"8 schedules .* on cluster tcp://127\.0\.0\.1:\d+", out.stdout)
