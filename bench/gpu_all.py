"""The one-command GPU session: everything a lent GPU should check and measure, in one run that
fits in 8 minutes on one H100/H200, writing one JSON file and one markdown table.

    python -m bench.gpu_all --out DIR [--budget 480] [--dry]

Stages, each a subprocess with its own time limit (a stage that fails or runs out is a row saying
so; the run goes on): the ``gpu``-marked tests; ``compute-sanitizer`` (memcheck) over
``bench.edge_shapes`` on each GPU backend, XLA's allocator switched to plain ``cudaMalloc`` so an
access past an array's end is outside any allocation; the GPU benchmark table (``bench.gpu``) per
backend; autotuning of the benchmark shapes (``bench.autotune_static --method gpu``, winners in
``autotune.json``). ``--dry`` checks the script on a CPU (tiny shapes, kernels in the interpreter, no
sanitizer). ``bench/gpu_session.sh`` is the command to hand the GPU machine (it installs the
carried wheels first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SANITIZER_PATHS = ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/compute-sanitizer/compute-sanitizer")


@dataclass(frozen=True)
class Stage:
    """One subprocess of the session: ``argv`` run with ``env`` added, for at most ``limit_s``."""

    name: str
    argv: tuple[str, ...]
    limit_s: float
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed (rc N)", "timed out", "skipped: why"
    seconds: float
    summary: str  # one line: the stage's own verdict (pytest's counts, the sanitizer's error summary)
    tail: str = field(repr=False, default="")


def find_sanitizer() -> str | None:
    """``compute-sanitizer``'s path, from PATH or the usual CUDA install places."""
    found = shutil.which("compute-sanitizer")
    return found or next((p for p in SANITIZER_PATHS if os.path.exists(p)), None)


def gpu_backends() -> list[str]:
    """The GPU code generators this fusec has (Pallas always; Triton once it is built)."""
    from fusec.codegen.backend import BACKEND_REGISTRY

    return [b for b in ("pallas", "triton") if b in BACKEND_REGISTRY]


def summarize(name: str, output: str) -> str:
    """The line of a stage's output that says how it went."""
    patterns = {"tests": r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).* in [\d.]+s.*?)\s*=*$",
                "sanitizer": r"(ERROR SUMMARY: \d+ errors?)", "edge-shapes": r"^(\d+/\d+ edge-shaped cases .*)$",
                "bench": r"^# (\d+ rows in .*)$"}
    pattern = patterns.get(name.split(":")[0])
    if pattern:
        hits = re.findall(pattern, output, re.MULTILINE)
        if hits:
            return hits[-1]
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def run_stage(stage: Stage, deadline: float) -> StageResult:
    """Runs one stage within its own limit and what is left of the session's."""
    limit = min(stage.limit_s, deadline - time.monotonic())
    if limit < 5:
        return StageResult(stage.name, "skipped: the session's time budget is spent", 0.0, "")
    env = {**os.environ, **dict(stage.env), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    try:
        done = subprocess.run(stage.argv, env=env, capture_output=True, text=True, timeout=limit)
        output = done.stdout + done.stderr
        status = "ok" if done.returncode == 0 else f"failed (rc {done.returncode})"
    except subprocess.TimeoutExpired as e:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (e.stdout, e.stderr))
        status = f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - t0
    result = StageResult(stage.name, status, seconds, summarize(stage.name, output), output[-4000:])
    print(f"[{stage.name}] {result.status} in {seconds:.0f} s: {result.summary}", file=sys.stderr, flush=True)
    return result


def stages(out: Path, dry: bool, backends: list[str], sanitizer: str | None) -> list[Stage]:
    """The session's stages in the order they run, sized to fit 8 minutes on one H100/H200."""
    py = sys.executable
    dry_flag = ("--dry",) if dry else ()
    plan = [Stage("tests", (py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={out / 'gpu_tests.xml'}"), 180)]
    # Plain cudaMalloc per buffer instead of XLA's pooled allocator: memcheck only sees accesses
    # outside every allocation, and a pool would hide an overhanging read inside it.
    unpooled = (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"), ("XLA_PYTHON_CLIENT_ALLOCATOR", "platform"))
    for backend in backends:
        edge = (py, "-m", "bench.edge_shapes", "--backend", backend, *dry_flag)
        if sanitizer and not dry:
            plan.append(Stage(f"sanitizer:{backend}", (sanitizer, "--tool", "memcheck", "--error-exitcode", "9",
                                                       *edge), 120, unpooled))
        else:
            plan.append(Stage(f"edge-shapes:{backend}", edge, 120))
    for backend in backends:
        plan.append(Stage(f"bench:{backend}", (py, "-m", "bench.gpu", "--backend", backend, *dry_flag,
                                               "--json", str(out / f"bench_{backend}.json")), 240))
    # Last, with what time is left: the benchmark shapes' GEMVs autotuned on this GPU (the static
    # model's best 3 of 8 candidates timed), the winners in an autotune cache file among the results.
    tune = ("--dry",) if dry else ("--method", "gpu", "--limit", "8", "--top", "3")
    plan.append(Stage("autotune", (py, "-m", "bench.autotune_static", *tune), 150,
                      (("FUSEC_AUTOTUNE_CACHE", str(out / "autotune.json")),)))
    return plan


def markdown(device: str, results: list[StageResult], rows: list[dict[str, Any]]) -> str:
    """The session as markdown: a stage table, then the benchmark rows (for BENCHMARKS.md)."""
    from bench.gpu import COLUMNS
    from bench.timing import table

    lines = [f"## GPU session on {device}", "", "| stage | status | seconds | summary |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.summary.replace('|', '/')} |" for r in results]
    if rows:
        lines += ["", "```", table(rows, ["backend", *COLUMNS]), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-session", help="folder for gpu_all.json, gpu_all.md and logs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole session")
    parser.add_argument("--dry", action="store_true", help="check the script on a CPU")
    ns = parser.parse_args(argv)
    import jax

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    if not ns.dry and device.platform != "gpu":
        print("bench.gpu_all needs a GPU (use --dry to check the script on a CPU)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + ns.budget
    sanitizer = find_sanitizer()
    results = [run_stage(s, deadline) for s in stages(out, ns.dry, gpu_backends(), sanitizer)]
    rows: list[dict[str, Any]] = []
    for path in sorted(out.glob("bench_*.json")):
        backend = path.stem.removeprefix("bench_")
        rows += [{"backend": backend, **r} for r in json.loads(path.read_text())["rows"]]
    payload = {"device": device.device_kind, "dry": ns.dry, "jax": jax.__version__, "sanitizer": sanitizer,
               "stages": [asdict(r) for r in results], "rows": rows}
    (out / "gpu_all.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
    (out / "gpu_all.md").write_text(markdown(device.device_kind, results, rows))
    print((out / "gpu_all.md").read_text())
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
