"""The soak: hours of churn in minutes. Does memory, descriptors and tasks stay flat?

A pool of browser-like connections (bench/soak.mjs: our JavaScript client over Node's ``ws``,
Chrome's headers, a session cookie, permessage-deflate offered) is held at ``--connections``
while ``--churn`` of them a second are replaced, a share ``--abrupt`` by a TCP reset without a
close frame, and broadcasts and group messages are published through ``POST /api/publish``
(a batch every 100 ms, to the nodes in turn). Every ``--interval`` seconds each node's RSS,
open descriptors (/proc/PID/fd), asyncio tasks and connections (``/metrics``) are sampled
beside the clients' p99 delivery latency, and a line is printed. At the end: the slope of each
column (least squares over the samples after the warm-up), what the clients were owed and got,
and the verdict.

The verdict (exit status 1 when it fails), per node, over the samples after the warm-up:

- memory: RSS may grow by at most ``--rss-bound`` MiB over the measured span (slope x span);
- descriptors: likewise ``--fd-bound`` over the span, and at every sample no more than the
  open connections plus what the node held idle plus the handshakes and closes in flight
  (``FD_SLACK`` + 2 x churn: a second's worth each way);
- after the clients are gone, descriptors and tasks back to within ``IDLE_SLACK`` of idle;
- delivery: every message a connection was owed (published after its welcome, before it was
  doomed, to a stream it listens to) arrived within the grace (``--min-delivery``).

Nodes: ``--nodes 1`` is one hypercorn process; ``--nodes 2`` two on the same SQLite file,
fanning out through a redis-server of the run's own (a free port, no persistence), or, with
``--redis URL``, through that server under a key prefix of the run's own (deleted at the end).

    python bench/soak.py --duration 600 --plot docs/img/soak.png --json bench/results-soak.json
    python bench/soak.py --duration 60            # what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
from bench.run import SECRET, cpu_seconds, family, prepare, rss_kib  # noqa: E402 - the root first
from wsfanout.backplane.redis.link import POOL_MAX, QUERY_POOL_MAX  # noqa: E402

API_KEY = "soak-api-key"
MIB = 1024
METRICS_TIMEOUT = 5  # seconds
FD_SLACK = 16  # descriptors a node may hold besides its sockets beyond what it held idle
CONCURRENCY = 100  # handshakes the clients have in flight at most
IDLE_SLACK = 8  # descriptors or tasks above idle once every client is gone
# With Redis, a node keeps the connections its pools opened under load (bounded: link.py),
# open once the clients are gone: descriptors it may hold beyond what it held idle.
REDIS_POOLS = POOL_MAX + QUERY_POOL_MAX
SERVER_ENV = {
    "WSFANOUT_LOG_LEVEL": "warning",
    "WSFANOUT_API_KEYS": API_KEY,
    "WSFANOUT_SECRET_KEY": SECRET,
}
COLUMNS = ("rss_mib", "fds", "tasks", "conns", "p99_ms")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[tuple[str, str]]:
    """A Redis URL and key prefix for the run: its own redis-server, or ``url`` under a
    prefix of its own whose keys are deleted at the end."""
    prefix = f"wsfanout-soak-{secrets.token_hex(4)}:"
    if url:
        try:
            yield url, prefix
        finally:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=5)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
        return
    if not shutil.which("redis-server"):
        raise SystemExit("--nodes 2 needs redis-server on PATH, or --redis URL")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", prefix
    finally:
        proc.terminate()
        proc.wait(10)


class Node:
    """One wsfanout process, as operators run it: ``wsfanout serve`` (hypercorn, pings every
    20 s), on a socket bound here."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsfanout.cli", "serve", "--bind", f"fd://{sock.fileno()}"],
            pass_fds=[sock.fileno()],
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT / "src"),
                "WSFANOUT_DATA_DIR": str(data_dir),
                **SERVER_ENV,
                **env,
            },
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        sock.close()
        self.cpu = (time.monotonic(), 0.0)  # (when, CPU seconds) at the last sample
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    assert self.proc.stderr is not None
                    raise RuntimeError(
                        f"the node did not start: {self.proc.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """Tasks and connections from /metrics; NaN for both when it does not answer in
        time (a node too busy to answer is a finding, and the run goes on)."""
        found = {"wsfanout_connections": math.nan, "wsfanout_asyncio_tasks": math.nan}
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as response:
                text = response.read().decode()
        except OSError:
            return found
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("wsfanout_connections", "wsfanout_asyncio_tasks"):
                found[name] = float(value)
        return found

    def sample(self) -> dict[str, float]:
        """RSS (MiB), open descriptors, tasks and connections, now."""
        metrics = self.metrics()
        now, cpu = time.monotonic(), cpu_seconds(self.proc.pid)
        share = (cpu - self.cpu[1]) / (now - self.cpu[0])
        self.cpu = (now, cpu)
        return {
            "cpu": share,
            "rss_mib": rss_kib(self.proc.pid) / MIB,
            "fds": sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in family(self.proc.pid)),
            "tasks": metrics["wsfanout_asyncio_tasks"],
            "conns": metrics["wsfanout_connections"],
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y), per second, over the points where y is known (a
    scrape that timed out is NaN); None for fewer than 2 of them."""
    points = [(t, y) for t, y in points if not math.isnan(y)]
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else None


def sustained(values: list[float]) -> bool:
    """Whether a rise is more than the sockets in flight at one sample or another: the lowest
    of the last third is above the highest of the first. Descriptors beside the connections
    jump by tens from sample to sample (handshakes and closes in flight), enough to tilt a
    minute's fit; a leak raises the floor. (One that stays under this, a descriptor left
    behind now and then, the check after the clients have gone finds.)"""
    values = [v for v in values if not math.isnan(v)]
    third = len(values) // 3
    return third > 0 and min(values[-third:]) > max(values[:third])


def run(args: argparse.Namespace, nodes: int, data_dir: Path, users: Any) -> dict[str, Any]:
    """One soak against ``nodes`` nodes: its samples, slopes, totals and verdict."""
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if nodes > 1:
            url, prefix = stack.enter_context(redis_server(args.redis))
            env = {"WSFANOUT_REDIS_URL": url, "WSFANOUT_REDIS_PREFIX": prefix}
        servers = []
        for _ in range(nodes):
            node = Node(data_dir, env)
            stack.callback(node.stop)
            servers.append(node)
        time.sleep(1)
        idle = [node.sample() for node in servers]
        config = {
            "urls": [f"ws://127.0.0.1:{node.port}/" for node in servers],
            "publishUrls": [f"{node.http}/api/publish" for node in servers],
            "apiKey": API_KEY,
            "cookies": users.cookies,
            "groups": users.groups,
            "connections": args.connections,
            "churn": args.churn,
            "abrupt": args.abrupt,
            "broadcasts": args.broadcasts,
            "groupMessages": args.group_messages,
            "size": args.size,
            "duration": args.duration,
            "interval": args.interval,
            "grace": args.grace,
            "concurrency": CONCURRENCY,
        }
        config_path = data_dir / f"soak-{nodes}.json"
        config_path.write_text(json.dumps(config))
        print(
            f"\n{nodes} node{'s' if nodes > 1 else ''}: {args.connections} connections, "
            f"churn {args.churn:g}/s ({args.abrupt:.0%} abrupt), {args.broadcasts:g} broadcasts/s, "
            f"{args.group_messages:g} group messages/s, {args.duration:g} s",
            flush=True,
        )
        clients = subprocess.Popen(
            [
                "node",
                "--experimental-detect-module",
                str(ROOT / "bench" / "soak.mjs"),
                str(config_path),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(clients.kill)  # nothing if it has exited
        assert clients.stdout is not None
        ready = json.loads(clients.stdout.readline() or '{"error": "the clients died"}')
        if "error" in ready:
            raise RuntimeError(ready["error"])
        print(f"pool open: {ready['connected']} connected, {ready['refused']} refused", flush=True)
        print(header(nodes), flush=True)
        samples = []
        end: dict[str, Any] = {}
        for raw in clients.stdout:
            line = json.loads(raw)
            if "error" in line:
                raise RuntimeError(line["error"])
            sample = {"t": line["t"], "clients": line, "nodes": [node.sample() for node in servers]}
            samples.append(sample)
            print(row(sample), flush=True)
            if line.get("end"):
                end = line
                break
        clients.wait(30)
        # Every client is gone: the nodes' connections fall to 0, and their descriptors and
        # tasks back to what they held idle.
        deadline = time.monotonic() + 30
        after = [node.sample() for node in servers]
        while any(s["conns"] for s in after) and time.monotonic() < deadline:
            time.sleep(1)
            after = [node.sample() for node in servers]
        time.sleep(2)  # the last closes' tasks end
        after = [node.sample() for node in servers]
    return judge(args, nodes, samples, idle, after, end, ready["t"])


def header(nodes: int) -> str:
    per = "  ".join(
        f"{'rss MiB':>8} {'fds':>5} {'tasks':>6} {'conns':>5} {'cpu':>4}" for _ in range(nodes)
    )
    rest = f"{'p99 ms':>7} {'conn/s':>6} {'drop/s':>6} {'pub/s':>6} {'deliv %':>8} {'clients':>7}"
    return f"{'t s':>5}  {per}  {rest}"


def row(sample: dict[str, Any]) -> str:
    c = sample["clients"]
    per = "  ".join(
        f"{n['rss_mib']:8.1f} {n['fds']:5d} {n['tasks']:6.0f} {n['conns']:5.0f} {n['cpu']:4.0%}"
        for n in sample["nodes"]
    )
    p99 = f"{c['p99_ms']:7.1f}" if c["p99_ms"] is not None else f"{'-':>7}"
    interval = c.get("interval", 10)
    delivery = f"{100 * c['delivered'] / c['expected']:8.3f}" if c["expected"] else f"{'-':>8}"
    return (
        f"{sample['t']:5.0f}  {per}  {p99} {c['connects'] / interval:6.0f} "
        f"{c['disconnects'] / interval:6.0f} {c['published'] / interval:6.0f} {delivery} "
        f"{c['loadgen_cpu']:7.0%}"
    )


def judge(
    args: argparse.Namespace,
    nodes: int,
    samples: list[dict[str, Any]],
    idle: list[dict[str, float]],
    after: list[dict[str, float]],
    end: dict[str, Any],
    ready: float = 0.0,
) -> dict[str, Any]:
    """The slopes and the verdict (the module's docstring) of one run's samples; ``ready``:
    when the pool was open and the churn began (seconds, on the samples' clock)."""
    start = ready + args.warmup
    measured = [s for s in samples if s["t"] >= start and not s["clients"].get("end")]
    span = (measured[-1]["t"] - measured[0]["t"]) if len(measured) > 1 else 0.0
    failures = []
    slopes: list[dict[str, float | None]] = []
    for i in range(nodes):
        per: dict[str, float | None] = {}
        for column in ("rss_mib", "fds", "tasks", "conns"):
            per[column] = slope([(s["t"], s["nodes"][i][column]) for s in measured])
        # Descriptors follow the connections open, which the churn moves by a few percent:
        # what must stay flat is the descriptors besides them.
        per["fds_besides"] = slope(
            [(s["t"], s["nodes"][i]["fds"] - s["nodes"][i]["conns"]) for s in measured]
        )
        slopes.append(per)
        name = f"node {i + 1}"
        growth = (per["rss_mib"] or 0.0) * span
        if growth > args.rss_bound:
            failures.append(
                f"{name}: RSS grew {growth:.1f} MiB over {span:.0f} s (bound {args.rss_bound} MiB)"
            )
        fd_growth = (per["fds_besides"] or 0.0) * span
        pools = REDIS_POOLS if nodes > 1 else 0  # the Redis pools open as the load asks
        if fd_growth > args.fd_bound + pools and sustained(
            [s["nodes"][i]["fds"] - s["nodes"][i]["conns"] for s in measured]
        ):
            failures.append(
                f"{name}: descriptors besides its connections grew {fd_growth:.0f} over "
                f"{span:.0f} s (bound {args.fd_bound + pools:g})"
            )
        # in flight: the handshakes the clients have open (at most CONCURRENCY, all on one
        # node at worst) and two seconds of this node's closes
        allowed = idle[i]["fds"] + FD_SLACK + pools + CONCURRENCY + 2 * args.churn / nodes
        for s in measured:
            extra = s["nodes"][i]["fds"] - s["nodes"][i]["conns"]
            if extra > allowed:
                failures.append(
                    f"{name}: at {s['t']:.0f} s, {extra:.0f} descriptors besides its "
                    f"connections (at most {allowed:.0f})"
                )
                break
        for column, more in (("fds", pools), ("tasks", 0)):
            if after[i][column] > idle[i][column] + IDLE_SLACK + more:
                failures.append(
                    f"{name}: {after[i][column]:.0f} {column} after every client left, "
                    f"{idle[i][column]:.0f} idle"
                )
    p99_slope = slope(
        [(s["t"], s["clients"]["p99_ms"]) for s in measured if s["clients"]["p99_ms"] is not None]
    )
    totals = end.get("totals", {})
    delivered, expected = totals.get("delivered", 0), totals.get("expected", 0)
    ratio = delivered / expected if expected else 0.0
    if expected and ratio < args.min_delivery:
        failures.append(
            f"delivered {delivered} of {expected} owed "
            f"({ratio:.4%}; at least {args.min_delivery:.2%})"
        )
    return {
        "nodes": nodes,
        "warmup_s": args.warmup,
        "ready_s": ready,
        "span_s": span,
        "samples": samples,
        "idle": idle,
        "after": after,
        "slopes_per_s": slopes,
        "p99_slope_ms_per_s": p99_slope,
        "totals": totals,
        "delivered_ratio": ratio,
        "failures": failures,
    }


def report(result: dict[str, Any]) -> None:
    nodes, span = result["nodes"], result["span_s"]
    print(f"slopes over {span:.0f} s after a {result['warmup_s']:g} s warm-up (per minute):")
    for i, per in enumerate(result["slopes_per_s"]):
        parts = [f"{c} {60 * v:+.3f}" if v is not None else f"{c} -" for c, v in per.items()]
        print(f"  node {i + 1}: " + ", ".join(parts))
        print(
            f"  node {i + 1}: idle {fmt_sample(result['idle'][i])}; "
            f"after the clients left {fmt_sample(result['after'][i])}"
        )
    p99 = result["p99_slope_ms_per_s"]
    print(
        f"  p99 latency: {60 * p99:+.2f} ms per minute" if p99 is not None else "  p99 latency: -"
    )
    t = result["totals"]
    print(
        f"  clients: {t.get('connects', 0)} connects, {t.get('disconnects', 0)} disconnects "
        f"({t.get('abrupt', 0)} abrupt), {t.get('lost', 0)} lost, {t.get('refused', 0)} refused; "
        f"published {t.get('published', 0)} ({t.get('publishFailed', 0)} failed, "
        f"{t.get('skipped', 0)} skipped); delivered {t.get('delivered', 0)} "
        f"of {t.get('expected', 0)} owed ({result['delivered_ratio']:.4%})"
    )
    verdict = "PASS" if not result["failures"] else "FAIL: " + "; ".join(result["failures"])
    print(f"{nodes} node{'s' if nodes > 1 else ''}: {verdict}", flush=True)


def fmt_sample(s: dict[str, float]) -> str:
    return (
        f"{s['rss_mib']:.1f} MiB, {s['fds']:.0f} fds, {s['tasks']:.0f} tasks, "
        f"{s['conns']:.0f} connections"
    )


def plot(results: list[dict[str, Any]], path: Path, connections: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = (
        ("rss_mib", "RSS (MiB)"),
        ("fds", "open descriptors"),
        ("tasks", "asyncio tasks"),
        ("p99_ms", "p99 delivery latency (ms)"),
    )
    for ax, (column, title) in zip(axes.flat, panels, strict=True):
        for result in results:
            nodes = result["nodes"]
            ts = [s["t"] for s in result["samples"] if not s["clients"].get("end")]
            kept = [s for s in result["samples"] if not s["clients"].get("end")]
            if column == "p99_ms":
                ax.plot(
                    ts,
                    [s["clients"]["p99_ms"] for s in kept],
                    marker=".",
                    label=f"{nodes} node{'s' if nodes > 1 else ''}",
                )
                continue
            for i in range(nodes):
                label = "1 node" if nodes == 1 else f"2 nodes: node {i + 1}"
                ax.plot(ts, [s["nodes"][i][column] for s in kept], marker=".", label=label)
                if column == "fds":
                    ax.plot(ts, [s["nodes"][i]["conns"] for s in kept], linestyle=":", color="grey")
        end_of_warmup = results[0].get("ready_s", 0.0) + results[0]["warmup_s"]
        ax.axvline(end_of_warmup, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    axes[0][0].legend(fontsize=8)
    axes[1][1].legend(fontsize=8)
    fig.suptitle(
        f"wsfanout soak: {connections:,} connections churning; "
        "dotted: connections open; dashed: end of warm-up",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def rejudge(saved_args: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A saved run's result judged again by this code's verdict, from its samples."""
    args = argparse.Namespace(**saved_args)
    end = {"totals": result["totals"]}
    nodes, samples = result["nodes"], result["samples"]
    ready = result.get("ready_s", 0.0)  # runs before it was kept: the warm-up counted from 0
    return judge(args, nodes, samples, result["idle"], result["after"], end, ready)


def markdown(results: list[dict[str, Any]], every: int = 6) -> str:
    """The docs' tables of a run: a row per ``every`` samples and the last, per node; then
    each node's slopes and verdict."""
    out = []
    for result in results:
        nodes = result["nodes"]
        kept = [s for s in result["samples"] if not s["clients"].get("end")]
        rows = [s for i, s in enumerate(kept) if i % every == 0 or i == len(kept) - 1]
        per = " | ".join(
            f"RSS MiB{n} | fds{n} | tasks{n} | conns{n}"
            for n in ([""] if nodes == 1 else [" (1)", " (2)"])
        )
        out.append(f"**{nodes} node{'s' if nodes > 1 else ''}**\n")
        out.append(f"| t (s) | {per} | p99 (ms) | delivered |")
        out.append("|" + " --- |" * (2 + 4 * nodes + 1))
        for s in rows:
            c = s["clients"]
            cells = " | ".join(
                f"{n['rss_mib']:.1f} | {n['fds']} | {n['tasks']:.0f} | {n['conns']:.0f}"
                for n in s["nodes"]
            )
            p99 = f"{c['p99_ms']:.0f}" if c["p99_ms"] is not None else "-"
            ratio = f"{c['delivered']}/{c['expected']}"
            out.append(f"| {s['t']:.0f} | {cells} | {p99} | {ratio} |")
        out.append("")
        span = result["span_s"]
        for i, slopes in enumerate(result["slopes_per_s"]):
            parts = ", ".join(
                f"{name} {60 * v:+.2f}/min" for name, v in slopes.items() if v is not None
            )
            out.append(f"- node {i + 1}, slopes over {span:.0f} s after the warm-up: {parts}")
        p99 = result["p99_slope_ms_per_s"]
        t = result["totals"]
        out.append(
            f"- p99 {60 * p99:+.1f} ms/min; {t['connects']} connects, {t['disconnects']} "
            f"disconnects ({t['abrupt']} abrupt), {t['lost']} lost; delivered "
            f"{t['delivered']} of {t['expected']} owed"
            if p99 is not None
            else "- p99: -"
        )
        verdict = "; ".join(result["failures"]) or "pass"
        out.append(f"- verdict: **{verdict}**\n")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of churn (default 600)")
    p.add_argument(
        "--nodes",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1, 2],
        help="1, 2 or both (default)",
    )
    p.add_argument("--connections", type=int, default=5000, help="the pool (default 5000)")
    p.add_argument(
        "--users",
        type=int,
        default=1000,
        help="users, in groups of 10; connection i is user i %% users (default 1000: 5 tabs each)",
    )
    p.add_argument(
        "--churn",
        type=float,
        default=DEFAULT_CHURN,
        help=f"connects and disconnects a second (default {DEFAULT_CHURN:g}; the issue asked 100)",
    )
    p.add_argument(
        "--abrupt",
        type=float,
        default=0.25,
        help="share of disconnects by TCP reset (default 0.25)",
    )
    p.add_argument(
        "--broadcasts",
        type=float,
        default=DEFAULT_BROADCASTS,
        help=f"per second (default {DEFAULT_BROADCASTS:g}; the issue asked 100)",
    )
    p.add_argument(
        "--group-messages",
        type=float,
        default=DEFAULT_GROUPS,
        help=f"per second (default {DEFAULT_GROUPS:g}; the issue asked 1000)",
    )
    p.add_argument(
        "--issue-rates",
        action="store_true",
        help="churn 100, 100 broadcasts and 1000 group messages a second",
    )
    p.add_argument(
        "--size", type=int, default=100, help="bytes of each message's text (default 100)"
    )
    p.add_argument(
        "--interval", type=float, default=10, help="seconds between samples (default 10)"
    )
    p.add_argument(
        "--warmup", type=float, help="seconds not in the slopes (default: min(60, duration / 3))"
    )
    p.add_argument("--grace", type=float, default=5, help="seconds a message may take (default 5)")
    p.add_argument(
        "--rss-bound",
        type=float,
        default=RSS_BOUND,
        help=f"MiB of RSS growth allowed over the span (default {RSS_BOUND})",
    )
    p.add_argument(
        "--fd-bound",
        type=float,
        default=FD_BOUND,
        help=f"descriptors of growth allowed (default {FD_BOUND})",
    )
    p.add_argument(
        "--min-delivery",
        type=float,
        default=0.999,
        help="share of owed messages that must arrive (default 0.999)",
    )
    p.add_argument(
        "--redis",
        help="two nodes through this Redis (under a key prefix of the run's own) "
        "instead of a redis-server of their own",
    )
    p.add_argument("--plot", type=Path, help="write the curves here (PNG, matplotlib)")
    p.add_argument("--json", type=Path, help="write the samples and verdicts here")
    p.add_argument(
        "--table",
        type=Path,
        help="print the docs' tables of a run saved with --json (and --plot it); run nothing",
    )
    return p


# What a 2-core machine shared with other work carried (docs/soak.md): the issue's 5,000
# connections, half its churn, a fraction of its publishing; --issue-rates has its own.
DEFAULT_CHURN = 50.0
DEFAULT_BROADCASTS = 0.2
DEFAULT_GROUPS = 10.0
RSS_BOUND = 16.0  # MiB over the measured span (docs/soak.md: The verdict)
FD_BOUND = 20.0


def stopped(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop the nodes, the clients and Redis on the way out


def main() -> int:
    signal.signal(signal.SIGTERM, stopped)
    args = parser().parse_args()
    if args.table:
        saved = json.loads(args.table.read_text())
        print(markdown([rejudge(saved["args"], result) for result in saved["results"]]))
        if args.plot:
            plot(saved["results"], args.plot, saved["args"]["connections"])
        return 0
    if args.issue_rates:
        args.churn, args.broadcasts, args.group_messages = 100.0, 100.0, 1000.0
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 3)
    if shutil.which("node") is None:
        raise SystemExit("the soak's clients need Node.js (apt-get install nodejs npm)")
    with tempfile.TemporaryDirectory(prefix="wsfanout-soak-") as tmp:
        data_dir = Path(tmp)
        started = time.monotonic()
        users = prepare(data_dir / "wsfanout.sqlite3", args.users)
        print(f"{args.users} users with sessions in {time.monotonic() - started:.0f} s", flush=True)
        results = []
        for nodes in args.nodes:
            result = run(args, nodes, data_dir, users)
            report(result)
            results.append(result)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "results": results,
                },
                indent=1,
            )
        )
    if args.plot:
        plot(results, args.plot, args.connections)
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
