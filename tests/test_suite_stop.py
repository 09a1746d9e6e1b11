"""The suite itself: a run stopped with SIGTERM (a CI job's time limit, `timeout`) leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import ROOT, processes_where, processes_with_env

SLEEPER = """
import time
from pathlib import Path


def test_waits_with_the_stores_up(stores):
    Path({started!r}).write_text("up")
    time.sleep(120)
"""


def test_a_run_stopped_with_sigterm_stops_the_servers_its_fixtures_started(tmp_path: Path):
    started = tmp_path / "started"
    (tmp_path / "test_sleeper.py").write_text(SLEEPER.format(started=str(started)))
    run_id = uuid.uuid4().hex
    pytest_run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--basetemp", str(tmp_path / "base"), str(tmp_path / "test_sleeper.py")],
        cwd=ROOT, env={**os.environ, "GATEWAY_TEST_RUN": run_id}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert pytest_run.poll() is None, pytest_run.stdout.read().decode()
            assert time.monotonic() < deadline, "the stores did not start"
            time.sleep(0.2)
        servers = _started(run_id, tmp_path / "base")
        assert len(servers) >= 2, servers  # Valkey and PostgreSQL
        pytest_run.send_signal(signal.SIGTERM)
        pytest_run.wait(timeout=60)
        deadline = time.monotonic() + 10
        while (left := _started(run_id, tmp_path / "base")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == {}, left
    finally:
        if pytest_run.poll() is None:
            pytest_run.kill()
        for pid in _started(run_id, tmp_path / "base"):
            os.kill(pid, signal.SIGKILL)


def _started(run_id: str, base: Path) -> dict[int, str]:
    """The run's processes but pytest itself: those with its environment, and those working in its folders (Valkey
    is started with an environment of its own)."""
    pids = set(processes_with_env("GATEWAY_TEST_RUN", run_id, exact=True))
    pids |= set(processes_where(lambda entry: str(base) in os.readlink(entry / "cwd")))
    named = {pid: _name(pid) for pid in pids}
    return {pid: name for pid, name in named.items() if "pytest" not in name}


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"
