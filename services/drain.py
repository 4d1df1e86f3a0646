"""Drain this pod's Ray node before the pod stops: the serving worker pods' preStop hook.

``python -m smartpath.services.drain --timeout-s 150 --health-url http://127.0.0.1:8000/-/healthz``

1. Ask the GCS to drain this node, the request ``ray drain-node`` makes (reason PREEMPTION: the
   pod goes away whatever runs on it; deadline ``--timeout-s`` from now). Ray schedules nothing
   new here, and Serve starts replacements elsewhere for the node's replicas and marks the node's
   proxy as draining.
2. A draining proxy answers its health check with 503, so KubeRay's readiness probe fails and the
   serve Service stops sending this pod new calls. The proxy keeps serving the calls it has and
   stops once it is idle (after Serve's minimum draining period, 30 s).
3. Wait until the proxy no longer answers at all, or ``--timeout-s``. Then the kubelet sends
   SIGTERM, which tini forwards to ``ray start`` (see the chart's ``smartpath.rayCommand``).

The hook always exits 0 and prints what happened: Kubernetes only logs a failed preStop hook and
goes on stopping the pod, so failing would add nothing but noise.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

__all__ = ["drain_node_args", "main", "request_drain", "wait_until_stopped"]

REASON = "DRAIN_NODE_REASON_PREEMPTION"


def drain_node_args(timeout_s: int) -> list[str]:
    """Arguments of ``ray drain-node`` for this node (Ray's default: the node it runs on)."""
    return [
        "--reason",
        REASON,
        "--reason-message",
        "SmartPath pod stopping (preStop)",
        "--deadline-remaining-seconds",
        str(timeout_s),
    ]


def request_drain(timeout_s: int) -> None:
    """Ask the GCS to drain this node (``ray drain-node``, in process); raises if refused."""
    from ray.scripts.scripts import drain_node

    drain_node.main(drain_node_args(timeout_s), standalone_mode=False)


def _proxy_answers(health_url: str, timeout_s: float) -> bool:
    """False once nothing listens at ``health_url``; True for any answer (200, or 503 draining)
    and for a slow one."""
    try:
        with urllib.request.urlopen(health_url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # 503 "This node is being drained."
    except urllib.error.URLError as exc:
        return not isinstance(exc.reason, ConnectionRefusedError)
    except OSError:  # reset or timed out mid-answer: the proxy is still there
        return True


def wait_until_stopped(
    health_url: str,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll ``health_url`` until the Serve proxy behind it has stopped (True) or ``timeout_s``
    has passed (False)."""
    deadline = clock() + timeout_s
    while True:
        if not _proxy_answers(health_url, min(2.0, poll_s * 2)):
            return True
        if clock() + poll_s > deadline:
            return False
        sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """The preStop hook: drain this node, then wait for its Serve proxy to stop."""
    parser = argparse.ArgumentParser(prog="python -m smartpath.services.drain")
    parser.add_argument("--timeout-s", type=int, required=True, help="most seconds to wait")
    parser.add_argument(
        "--health-url",
        default="http://127.0.0.1:8000/-/healthz",
        help="this node's Serve proxy health check",
    )
    parser.add_argument("--poll-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        request_drain(args.timeout_s)
    except (Exception, SystemExit) as exc:  # a refused drain must not skip the wait
        print(f"smartpath drain: the drain request failed ({exc}); waiting anyway", flush=True)
    left = args.timeout_s - (time.monotonic() - start)
    stopped = wait_until_stopped(args.health_url, max(0.0, left), poll_s=args.poll_s)
    outcome = "the Serve proxy stopped" if stopped else "timed out with the proxy still up"
    print(f"smartpath drain: {outcome} after {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
