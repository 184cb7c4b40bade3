"""A real one-node SLURM for the tests in this folder: started by start_cluster.sh, stopped at the end.

The tests skip, with the reason, where the cluster cannot be had (not root, no apt, packages not
installable); FUSION_SLURM_TESTS=0 skips them on purpose.
"""

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("FUSION_SLURM_TESTS") == "0":
        pytest.skip("FUSION_SLURM_TESTS=0")
    proc = subprocess.run(["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode == 2:
        pytest.skip(f"no SLURM cluster here: {proc.stderr.strip()}")
    if proc.returncode != 0:  # daemons may be up though the node never went idle: stop what the script started
        subprocess.run(["bash", str(HERE / "stop_cluster.sh")], timeout=60)
        pytest.fail(f"start_cluster.sh failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    started = "already up" not in proc.stdout
    yield
    if started:
        subprocess.run(["bash", str(HERE / "stop_cluster.sh")], timeout=60)
