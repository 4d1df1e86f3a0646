"""Serve autoscaling on a local two-node Ray cluster under real gRPC load: encoder and decoder
scale out onto the worker node while clients call, and back in once they stop; no call fails.

The scenario (``tests/services/autoscaling_scenario.py``) runs in a process of its own, since a
multi-node ``ray.cluster_utils.Cluster`` cannot share this process with the session's Ray; its
last line of output is the JSON object of what it observed. The chart renders the same
autoscaling (``tests/deploy/test_chart.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.services.autoscaling_scenario import AUTOSCALED, AUTOSCALING, CALLS_AFTER_REMOVAL

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_LIMIT_S = 270  # within pytest's 300 s; the scenario takes about 90 s on two cores


def run_scenario(tmp: Path) -> dict[str, Any]:
    """Run the scenario in ``tmp``; the observations it prints."""
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("SMARTPATH_")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.services.autoscaling_scenario", str(tmp)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: the Ray nodes go with it on a timeout
    )
    try:
        out, err = proc.communicate(timeout=SCENARIO_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"scenario ran over {SCENARIO_LIMIT_S} s:\n{err[-4000:]}") from None
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_encoder_and_decoder_scale_out_onto_the_worker_node_and_back_in(tmp_path: Path) -> None:
    obs = run_scenario(tmp_path)
    head, worker = obs["head_node"], obs["worker_node"]
    top = AUTOSCALING["max_replicas"]
    stopped = obs["load_stopped_s"]

    assert set(obs["calls"]) == {"OK"}, obs["calls"]  # no call failed while replicas came and went
    assert obs["calls"]["OK"] >= 50, obs["calls"]
    for app in AUTOSCALED:
        assert obs["max_running"][app] == top, (app, obs["timeline"])
        assert obs["scaled_up_s"][app] is not None and obs["scaled_up_s"][app] < stopped, app
        # The head has CPUs for the minimum replicas only: every added replica ran on the worker.
        nodes = list(obs["placements"][app].values())
        assert nodes.count(head) == 1, (app, nodes)
        assert set(nodes) == {head, worker}, (app, nodes)
        # Back to the minimum, and Serve stopped the worker's replicas, not the head's.
        assert obs["scaled_down_s"][app] is not None, (app, obs["timeline"][-5:])
        assert obs["scaled_down_s"][app] > stopped, app
        assert obs["nodes_after_scale_down"][app] == [head], app
    assert obs["timeline"][-1][1] == {app: [1, 1] for app in AUTOSCALED}
    # Nothing ran on the worker node any more: removing it costs no call.
    assert obs["calls_after_removal"] == {"OK": CALLS_AFTER_REMOVAL}

    up = ", ".join(
        f"{app} 1->{obs['max_running'][app]} (added {obs['scale_up_started_s'][app]:.1f} s, "
        f"running {obs['scaled_up_s'][app]:.1f} s into the load; back to 1 "
        f"{obs['scaled_down_s'][app] - stopped:.1f} s after it stopped)"
        for app in AUTOSCALED
    )
    print(
        f"\nautoscaling: {up}; {obs['calls']['OK']} calls OK (p50 {obs['call_s']['p50']} s), "
        f"load {stopped:.1f} s, phases {obs['phases_s']}"
    )
