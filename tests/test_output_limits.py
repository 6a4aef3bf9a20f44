"""Output bounded (issue 12.1, CONTRACT "Limits"): lines cut at 16 KiB and marked, a splitter
that looks only at what arrived, backpressure from the runner to the log writer, terraform
interrupted (state kept) past ``max_output_bytes``, and a worker whose memory stays flat while
a configuration floods 50 MB or prints one 200 MB line (measured on a real worker process).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
import tracemalloc

import pytest
from test_reliability import environment
from test_runners import docker_client, kind, make_settings, new_runner, run_tf  # noqa: F401 - fixtures

from service.runners.base import Step
from service.runners.output import MAX_LINE_BYTES, LineCutter, RunOutput

# ---------------------------------------------------------------- the splitter


def test_a_line_over_16_kib_is_cut_and_marked():
    cutter = LineCutter()
    line = b"x" * (MAX_LINE_BYTES + 1000)
    assert cutter.feed(line + b"\nnext\n") == [
        "x" * MAX_LINE_BYTES + "…[line cut: 1000 bytes]", "next"
    ]
    assert cutter.feed(b"tail without newline") == []
    assert cutter.flush() == ["tail without newline"]


def test_a_cut_never_splits_a_character():
    cutter = LineCutter(limit=5)
    (line,) = cutter.feed("abcdé…\n".encode())  # é is 2 bytes at offsets 4-5
    assert line == "abcd…[line cut: 5 bytes]"


def test_crlf_and_invalid_utf8():
    cutter = LineCutter()
    assert cutter.feed(b"a\r\nb\xff\n") == ["a", "b\ufffd"]


def test_one_200_mb_line_costs_neither_memory_nor_rescans():
    """The splitter holds at most 16 KiB of a line and looks at each byte once: 200 MB in
    64 KiB chunks, as a run reads it."""
    cutter = LineCutter()
    chunk = b"y" * 65536
    tracemalloc.start()
    started = time.monotonic()
    for _ in range(200_000_000 // len(chunk)):
        assert cutter.feed(chunk) == []
    (line,) = cutter.feed(b"end\n")
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert line.endswith(f"…[line cut: {200_000_000 // 65536 * 65536 + 3 - MAX_LINE_BYTES} bytes]")
    assert peak < 1_000_000, peak
    assert elapsed < 10, elapsed  # linear: a rescan per chunk would take hours


async def test_run_output_stops_keeping_lines_past_the_limit_and_fires_once():
    kept: list[str] = []
    fired: list[int] = []

    async def sink(stream, line):
        kept.append(line)

    out = RunOutput(sink, [Step(name="apply")], max_bytes=1000, marker="::m:: ",
                    on_limit=lambda: fired.append(1))
    await out.feed("stderr", b"::m:: begin apply\n")
    for i in range(100):
        await out.feed("stdout", f"line {i:04d} ".encode() * 5 + b"\n")
    await out.feed("stderr", b"::m:: end apply 130\n")
    await out.finish()
    assert fired == [1]
    assert out.limited
    assert sum(len(line) + 1 for line in kept if not line.startswith("output limit")) <= 1100
    assert any(line.startswith("output limit of 1000 bytes reached") for line in kept)
    assert out.record.failed == "apply"  # markers are still read past the limit
    assert not any("::m::" in line for line in kept)


# ---------------------------------------------------------------- both runners

FLOOD = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "flood" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" { command = "%s" }
}
"""
# 1000-byte lines, and one line of N bytes; busybox is on PATH in the runner image and the host.
LINES = "x=$(busybox printf '%%01000d' 0); busybox yes $x | busybox head -c %d"
ONE_LINE = "busybox head -c %d /dev/zero | busybox tr '\\\\0' x"
# Terraform passes a provisioner's lines up to 64 KiB and drops longer ones; in a container,
# a process can write past terraform, straight to the container's output (pid 1's stdout). In
# the local sandbox it cannot: that file is the worker's, out of the sandbox user's reach.
ONE_LINE_PAST_TERRAFORM = ONE_LINE + " > /proc/1/fd/1"


async def test_past_the_output_limit_terraform_is_interrupted_and_its_state_kept(kind, tmp_path):  # noqa: F811
    runner = new_runner(kind, make_settings(tmp_path))
    try:
        run = await run_tf(runner, FLOOD % (LINES % 50_000_000), max_output_bytes=256 * 1024)
    finally:
        await runner.close()
    result = run.result
    assert result.output_limited and not result.timed_out and not result.interrupted
    assert result.exit_code != 0
    assert result.failed_step == "apply"
    assert any(s == "system" and "output limit of 262144 bytes reached" in line
               for s, line in run.lines)
    kept = sum(len(line) + 1 for s, line in run.lines if s != "system")
    assert kept <= 256 * 1024 + 64 * 1024, kept
    assert result.state is not None and "terraform_data.a" in {
        f"{r['type']}.{r['name']}" for r in run.state["resources"]}


async def test_one_long_line_is_cut_in_the_log(kind, tmp_path):  # noqa: F811
    runner = new_runner(kind, make_settings(tmp_path))
    try:
        run = await run_tf(runner, FLOOD % (ONE_LINE % 40_000))
    finally:
        await runner.close()
    assert run.result.exit_code == 0, run.text[-2000:]
    long = [line for _, line in run.lines if "[line cut:" in line]
    assert len(long) == 1
    assert len(long[0].encode()) < MAX_LINE_BYTES + 100
    assert long[0].endswith(f"[line cut: {len('terraform_data.flood (local-exec): ') + 40_000 - MAX_LINE_BYTES} bytes]")


async def test_the_local_runners_reader_holds_no_long_line(tmp_path):
    """The local runner tails terraform's output file: one 200 MB line in it is read in 64 KiB
    chunks, cut, counted against the limit, and its disk blocks freed behind the reader."""
    from service.runners.local_files import tail_file

    path = tmp_path / "stdout"
    with open(path, "wb") as f:
        chunk = b"z" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write(b"\n")
    kept: list[str] = []
    fired: list[int] = []

    async def sink(stream, line):
        kept.append(line)

    out = RunOutput(sink, [Step(name="apply")], max_bytes=10 * 2**20, marker="::m:: ",
                    on_limit=lambda: fired.append(1))
    ended = asyncio.Event()
    ended.set()
    tracemalloc.start()
    await tail_file(path, "stdout", out, ended)
    await out.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fired == [1] and out.total == 200 * 2**20 + 1
    assert peak < 2_000_000, peak
    assert kept[0].startswith("output limit")  # the line itself is past the limit: not kept
    assert os.stat(path).st_blocks * 512 < 2 * 2**20  # read blocks were given back


# ---------------------------------------------------------------- a real worker's memory


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "runner", [pytest.param("local"), pytest.param("docker", marks=pytest.mark.docker)]
)
async def test_a_flood_and_a_huge_line_leave_the_workers_memory_flat(
    database_url, tmp_path, runner_image, runner
):
    """A worker process runs a warm-up deploy, then a deploy that prints 50 MB of 1000-byte
    lines, then (Docker) one that prints a single 200 MB line (default limit: 10 MiB). Each
    ends ``failed`` with reason ``output_limit``, with its state kept; the worker's RSS,
    sampled every 50 ms, grows by less than 64 MB over its level after the warm-up."""
    if runner == "local" and not shutil.which("terraform"):
        pytest.skip("no terraform on PATH")
    async with environment(database_url, tmp_path, runner_image, runner=runner) as env:
        label = f"tfdeploy-test-{secrets.token_hex(4)}"
        worker = env.spawn_worker("flood", docker_label=label if runner == "docker" else None)
        warm = await env.submit({"main.tf": FLOOD % "echo warm"}, workspace="warm")
        env.deploy_ids = [warm["id"]]
        assert (await env.wait(warm["id"]))["status"] == "succeeded"
        await asyncio.sleep(1)
        baseline = _rss_kib(worker.pid)
        peak = baseline
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _rss_kib(worker.pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        figures = []
        try:
            floods = [("flood", LINES % 50_000_000)]
            if runner == "docker":
                # Locally, only terraform's own output reaches the worker, and terraform drops
                # a provisioner's line over 64 KiB itself (it takes terraform ~2 minutes to
                # read 200 MB); the local reader's share is tested above.
                floods.append(("line", ONE_LINE_PAST_TERRAFORM % 200_000_000))
            for name, command in floods:
                started = time.monotonic()
                d = await env.submit({"main.tf": FLOOD % command}, workspace=name, max_attempts=1)
                env.deploy_ids.append(d["id"])
                done = await env.wait(d["id"], limit=300)
                figures.append((name, time.monotonic() - started, (peak - baseline) / 1024))
                log = await env.logs(d["id"])
                assert len(log.encode()) < 10 * 2**20 + 2**20
                assert done["status"] == "failed", done
                assert done["error"]["reason"] == "output_limit", done
                events = [e["type"] for e in await env.events(d["id"])]
                assert events == ["Requested", "Started", "StatePersisted", "Failed"], events
                assert "output limit of 10485760 bytes reached" in log
                state = (await env.client.get(f"/workspaces/{name}/state")).json()
                assert "a" in {r["name"] for r in state["resources"]}
        finally:
            stop.set()
            await sampler
        growth_mb = (peak - baseline) / 1024
        print(f"\nworker RSS ({runner}): baseline {baseline / 1024:.1f} MB, peak "
              f"{peak / 1024:.1f} MB, growth {growth_mb:.1f} MB; "
              + ", ".join(f"{n}: {t:.1f}s (growth so far {g:.1f} MB)" for n, t, g in figures))
        assert growth_mb < 64, growth_mb
        assert worker.poll() is None
