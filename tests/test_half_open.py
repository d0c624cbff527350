"""A client gone without a FIN (half-open TCP) releases the upstream within the send timeout.

Runs ``half_open.py`` in a network namespace of its own, where traffic control can make a
client vanish without touching anything else; that takes root (CAP_NET_ADMIN), ``unshare`` and
``tc`` (Debian's iproute2), which ``.ci/run`` makes sure of; without them the test is skipped,
with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("half_open.py")


def test_a_vanished_client_is_found_and_the_upstream_closed() -> None:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("tc")):
        pytest.skip(
            "needs root, unshare and tc: run as root after apt-get install iproute2 util-linux "
            "(.ci/run does)"
        )
    run = subprocess.run(
        ["unshare", "-n", sys.executable, str(SCENARIO)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    # the heartbeat (0.5 s) keeps data unacknowledged; TCP_USER_TIMEOUT (2 x 2 s) drops the
    # connection; Sanic cancels the handler, and the upstream closes
    assert result["outcome"] in ("client_disconnected", "timeout"), result
    assert result["upstream_closed_after"] is not None, result
    assert result["upstream_closed_after"] < 2.0 * 10, result  # bound: 10x the send timeout
    assert result["ended_after"] < 2.0 * 10, result
