"""Profile the serving path under load: py-spy on every proxy worker and the replicas, top entries printed.

Runs as a script in its own process: starts a `python -m runtime up` mock stack (benchmarks.stack), drives
it with the load generator (benchmarks.loadgen, in this process's event loop), and when the measured
window opens starts one `py-spy record --format raw --function --nonblocking` per profiled process for
the window's length. It then folds the collapsed stacks into per-function self and inclusive sample
counts and prints the top entries of each process, with the proxy's and the replicas' CPU seconds per
1,000 streamed tokens over the same window. Stops only what it started. Needs py-spy
(`pip install py-spy`) and the right to ptrace the stack's processes (root, or ptrace_scope 0).

    python benchmarks/profile_serving.py --preset scale1000 --ramp 10 --duration 30 --out results/profile
    python benchmarks/profile_serving.py --concurrency 200 --duration 20 --target replica --top 25

`--out DIR` keeps the raw collapsed stacks (`<role>-<pid>.folded`, readable by speedscope or
flamegraph.pl) and `profile.json` (the tables and the load summary). `--nonblocking` sampling does not
pause the target, so the profile perturbs the run little, at the price of an occasional torn stack.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from benchmarks.floor_server import install_uvloop  # noqa: E402
from benchmarks.loadgen import LoadConfig, raise_fd_limit, run_level  # noqa: E402
from benchmarks.serving_path import PRESETS  # noqa: E402
from benchmarks.meters import per_1k_tokens, stack_cpu_meters  # noqa: E402
from benchmarks.stack import MockStack  # noqa: E402
from benchmarks.stats import format_summary  # noqa: E402

log = logging.getLogger("bench")

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# --------------------------------------------------------------------------- pure folding


def short_frame(frame: str) -> str:
    """`func (/long/path/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`: the last two path parts."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    parts = m.group("file").replace("\\", "/").split("/")
    where = "/".join(parts[-2:])
    if m.group("line"):
        where += ":" + m.group("line")
    return "%s (%s)" % (m.group("func"), where)


@dataclass
class Folded:
    """Per-function sample counts of one process's collapsed stacks."""

    samples: int = 0
    self_counts: Counter = field(default_factory=Counter)
    total_counts: Counter = field(default_factory=Counter)

    def top(self, n: int, inclusive: bool = False) -> list[tuple[str, int, float]]:
        counts = self.total_counts if inclusive else self.self_counts
        return [(name, c, 100.0 * c / max(self.samples, 1)) for name, c in counts.most_common(n)]


def fold(lines: Iterable[str]) -> Folded:
    """Fold py-spy raw output (`frame;frame;...;leaf COUNT` per line, root first)."""
    out = Folded()
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        out.samples += n
        out.self_counts[frames[-1]] += n
        for name in set(frames):  # recursion counts once per sample
            out.total_counts[name] += n
    return out


def format_top(title: str, folded: Folded, n: int, rate: int, seconds: float) -> str:
    """Self and inclusive tables; '% core' is samples over (rate x seconds), i.e. share of one core."""
    wall = max(rate * seconds, 1.0)
    lines = ["== %s: %d busy samples (%.0f%% of one core)" % (title, folded.samples,
                                                               100.0 * folded.samples / wall)]
    for inclusive, label in ((False, "self"), (True, "inclusive")):
        lines.append("  top %d by %s time:%s%%busy  %%core" % (n, label, " " * 52))
        for name, count, pct in folded.top(n, inclusive):
            lines.append("    %-72s %6.1f %6.1f" % (name[:72], pct, 100.0 * count / wall))
    return "\n".join(lines)


# --------------------------------------------------------------------------- processes


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def stack_targets(stack: MockStack) -> dict[str, list[psutil.Process]]:
    """{"proxy": the gunicorn workers, "replica": the model_proc processes} of a running stack."""
    workers: list[psutil.Process] = []
    for root in stack.proxy_roots():
        try:
            workers += root.children()
        except psutil.NoSuchProcess:
            pass
    replicas = []
    if stack.proc is not None:
        for proc in psutil.Process(stack.proc.pid).children(recursive=True):
            cmd = _cmdline(proc)
            if any(a == "-m" and b == "model_proc" for a, b in zip(cmd, cmd[1:], strict=False)):
                replicas.append(proc)
    return {"proxy": workers, "replica": replicas}


class Recorder:
    """One `py-spy record` subprocess per target process, started together, waited for together."""

    def __init__(self, pyspy: str, outdir: Path, rate: int, seconds: float) -> None:
        self.pyspy = pyspy
        self.outdir = outdir
        self.rate = rate
        self.seconds = seconds
        self.runs: list[tuple[str, int, Path, subprocess.Popen]] = []

    def start(self, targets: dict[str, list[psutil.Process]]) -> None:
        for role, procs in targets.items():
            for proc in procs:
                path = self.outdir / ("%s-%d.folded" % (role, proc.pid))
                cmd = [self.pyspy, "record", "--pid", str(proc.pid), "--rate", str(self.rate),
                       "--duration", str(max(1, int(round(self.seconds)))), "--format", "raw", "--function",
                       "--nonblocking", "-o", str(path)]
                self.runs.append((role, proc.pid, path, subprocess.Popen(
                    cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)))
        log.info("bench [profile] py-spy on %s for %.0fs",
                 ", ".join("%s %d" % (r, p) for r, p, _, _ in self.runs), self.seconds)

    def wait(self) -> list[tuple[str, int, Optional[Folded]]]:
        out = []
        for role, pid, path, popen in self.runs:
            try:
                _, err = popen.communicate(timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                popen.kill()
                _, err = popen.communicate()
            if popen.returncode != 0 or not path.exists():
                log.error("bench [profile] py-spy on %s %d failed (%s): %s", role, pid, popen.returncode,
                          (err or b"").decode(errors="replace").strip()[-400:])
                out.append((role, pid, None))
                continue
            out.append((role, pid, fold(path.read_text(errors="replace").splitlines())))
        return out


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="py-spy profile of the proxy workers and replicas under load.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="scale1000",
                   help="workload defaults (benchmarks/serving_path.py presets); default %(default)s")
    for name, kind in (("replicas", int), ("ttft-ms", float), ("itl-ms", float), ("tokens", int),
                       ("concurrency", int), ("ramp", float), ("workers", int)):
        p.add_argument("--" + name, type=kind)
    p.add_argument("--duration", type=float, default=30.0, help="profiled (measured) seconds")
    p.add_argument("--target", choices=("all", "proxy", "replica"), default="all")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second per process")
    p.add_argument("--top", type=int, default=15, help="entries per table")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--out", help="directory for the .folded stacks and profile.json (default: a temp dir)")
    p.add_argument("--log-level", default="INFO")
    return p


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[ns.preset]
    keys = ("replicas", "ttft_ms", "itl_ms", "tokens", "concurrency", "ramp")
    out = {k: getattr(ns, k) if getattr(ns, k) is not None else preset[k] for k in keys}
    out.update(workers=ns.workers, duration=ns.duration, endpoint=ns.endpoint)
    return out


def run(ns: argparse.Namespace, pyspy: str, outdir: Path) -> dict[str, Any]:
    s = _settings(ns)
    max_ongoing = max(64, math.ceil(s["concurrency"] / max(s["replicas"], 1)) + 8)
    stack = MockStack(s["replicas"], s["ttft_ms"], s["itl_ms"], s["tokens"], s["workers"], max_ongoing)
    cfg = LoadConfig(endpoint=s["endpoint"], model="mock", max_tokens=s["tokens"], concurrency=s["concurrency"],
                     ramp=s["ramp"], duration=s["duration"])
    try:
        stack.start()
        stack.wait_ready()
        targets = stack_targets(stack)
        if ns.target != "all":
            targets = {ns.target: targets[ns.target]}
        recorder = Recorder(pyspy, outdir, ns.rate, s["duration"])
        meters = stack_cpu_meters(stack)

        def window_start() -> None:
            recorder.start(targets)
            for m in meters.values():
                m.start()

        def window_end() -> None:
            for m in meters.values():
                m.stop()

        level = asyncio.run(run_level(LoadConfig(**{**cfg.__dict__, "url": stack.url}),
                                      on_window_start=window_start, on_window_end=window_end))
        profiles = recorder.wait()
    finally:
        stack.stop()
    summary = level["summary"]
    tokens = summary["output_tokens_per_s"] * summary["window_s"]
    return {"settings": s, "summary": summary, "logs": str(stack.log_path),
            "cpu_s_per_1k_tokens": {k: per_1k_tokens(m.seconds, tokens) for k, m in meters.items()},
            "profiles": profiles}


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(message)s")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        log.error("bench [profile] py-spy not found: pip install py-spy")
        return 2
    outdir = Path(ns.out) if ns.out else Path(tempfile.mkdtemp(prefix="tokenrelay-profile-"))
    outdir.mkdir(parents=True, exist_ok=True)
    install_uvloop()
    raise_fd_limit()
    try:
        res = run(ns, pyspy, outdir)
    except RuntimeError as exc:
        log.error("bench %s", exc)
        return 1
    print(format_summary(res["summary"], "  "))
    cpu = res["cpu_s_per_1k_tokens"]
    print("CPU s / 1k tokens over the window: proxy %s, launcher+head+agent %s, replicas %s"
          % (cpu["proxy"], cpu["control"], cpu["replicas"]))
    report: dict[str, Any] = {k: v for k, v in res.items() if k != "profiles"}
    report["profiles"] = []
    for role, pid, folded in res["profiles"]:
        if folded is None:
            continue
        print(format_top("%s pid %d" % (role, pid), folded, ns.top, ns.rate, res["settings"]["duration"]))
        report["profiles"].append({
            "role": role, "pid": pid, "samples": folded.samples,
            "self": folded.top(ns.top), "inclusive": folded.top(ns.top, inclusive=True)})
    (outdir / "profile.json").write_text(json.dumps(report, indent=2))
    log.info("bench [done] stacks and profile.json in %s", outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
