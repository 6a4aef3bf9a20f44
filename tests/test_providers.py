"""Providers (issue 13, docs/providers.md): the mirror, the once-per-host cache, the lock file kept.

With the real hashicorp/null 2.1.2 provider (tests/providers_fixtures.py), real terraform:

- the pure parts: provider addresses, the configuration's requirements, lock files, mirror
  scans, terraform's h1 hash, the operator's CLI configuration;
- the ProviderSetup a run gets, applied by hand: plain ``terraform`` processes with network
  ``none`` (a bubblewrap sandbox with its own network namespace), and the runner image in Docker
  as user nobody with a read-only root, the mirror and cache mounted read-only;
- the cache against a real HTTPS network mirror that counts its downloads;
- lock files kept in PostgreSQL with the state version;
- deploys end to end through both runners: these need the runners to apply a ProviderSetup and
  return the lock file a run used (``RunRequest.providers``, ``RunResult.lock_file``), and skip
  with that reason until they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from providers_fixtures import (
    NULL_ADDRESS,
    NULL_RELABELLED,
    NULL_VERSION,
    PLATFORM,
    NetworkMirror,
    build_mirror,
    network_mirror_cli_config,
    null_config,
    null_provider_binary,
    null_zip,
    zip_hashes,
)

from service import lockfiles
from service.providers import CACHE_PATH, MIRROR_PATH, Providers
from service.providers.cache import Cached, ProviderCache
from service.providers.cliconfig import CliConfigError, Method, operator_methods, render
from service.providers.mirror import hash_dir, providers_for, scan
from service.providers.requirements import (
    LockEntry,
    LockFileError,
    Provider,
    config_requirements,
    parse_lock_file,
    render_lock_file,
)
from service.runners.base import ProviderSetup, RunRequest, RunResult
from service.settings import from_env
from service.validation import InvalidRequest, parse_deploy_request

NULL = Provider.parse(NULL_ADDRESS)
assert NULL is not None
TERRAFORM = os.environ.get("TFDEPLOY_TERRAFORM") or shutil.which("terraform")
BWRAP = shutil.which("bwrap")

needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not on PATH")
RUNNERS_APPLY_PROVIDERS = "providers" in RunRequest.__struct_fields__ and "lock_file" in RunResult.__struct_fields__
needs_runners = pytest.mark.skipif(
    not RUNNERS_APPLY_PROVIDERS,
    reason="the runners do not apply a ProviderSetup yet (RunRequest.providers and "
    "RunResult.lock_file come with the runners' branch)",
)


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="session")
def null_binary() -> Path:
    """The real provider binary (fetched once per machine, outside the repository)."""
    return null_provider_binary()


@pytest.fixture
def network_mirror(tmp_path: Path, null_binary: Path):
    mirror = NetworkMirror(tmp_path / "netmirror", versions=(NULL_VERSION, NULL_RELABELLED)).start()
    try:
        yield mirror
    finally:
        mirror.stop()



def providers_for_test(tmp_path: Path, *, mirror: Path | None = None, environ: dict[str, str] | None = None) -> Providers:
    settings = from_env(
        {}, data_dir=str(tmp_path / "data"),
        provider_mirror=str(mirror) if mirror else None,
        provider_cache=str(tmp_path / "cache"),
    )
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path / "home"),
           "XDG_DATA_DIRS": str(tmp_path / "no-data-dirs")}
    env.update(environ or {})
    return Providers(settings, environ=env)


def operator_env(tmp_path: Path, mirror: NetworkMirror) -> dict[str, str]:
    """The worker's environment when the operator takes providers from a network mirror."""
    config = tmp_path / "operator.tfrc"
    config.write_text(network_mirror_cli_config(mirror.url))
    return {"TF_CLI_CONFIG_FILE": str(config), "SSL_CERT_FILE": str(mirror.ca_file)}


def run_offline(workdir: Path, setup: ProviderSetup, files: dict[str, str], *, lock_file: str | None = None,
                commands: tuple[str, ...] = ("init", "apply")) -> subprocess.CompletedProcess[str]:
    """terraform in ``workdir`` with the setup's CLI config (host paths, as an unsandboxed
    local run sees them) and NO network: its own network namespace with only a loopback
    (bubblewrap, else ``unshare --net`` as root)."""
    isolate = offline_prefix(workdir)
    assert TERRAFORM is not None
    workdir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (workdir / name).write_text(content)
    if lock_file is not None:
        (workdir / ".terraform.lock.hcl").write_text(lock_file)
    host = setup.with_host_paths()
    (workdir / ".tmp").mkdir(exist_ok=True)
    (workdir / ".cli.tfrc").write_text(host.cli_config)
    script = " && ".join(
        {"init": "terraform init -input=false -no-color",
         "apply": "terraform apply -auto-approve -input=false -no-color"}[c] for c in commands
    )
    env = {
        "PATH": f"{Path(TERRAFORM).parent}:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir / ".tmp"),
        "TF_CLI_CONFIG_FILE": str(workdir / ".cli.tfrc"), "CHECKPOINT_DISABLE": "1", **host.env,
    }
    return subprocess.run(
        [*isolate, "sh", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )


def offline_prefix(workdir: Path) -> list[str]:
    if BWRAP is not None:
        return [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", str(workdir),
                str(workdir), "--unshare-net", "--die-with-parent", "--chdir", str(workdir)]
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--net", "--"]
    pytest.skip("neither bubblewrap nor unshare (as root) to run terraform without a network")


def locked_version(workdir: Path) -> str:
    return parse_lock_file((workdir / ".terraform.lock.hcl").read_text())[NULL].version


def docker_ready(image: str) -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.images.get(image)
        client.close()
        return True
    except Exception:
        return False


def run_in_docker(image: str, workdir: Path, setup: ProviderSetup, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The runner image as the Docker runner starts it: user nobody, read-only root, network
    none; the setup's mounts read-only, its CLI config as TF_CLI_CONFIG_FILE."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o777)
    for name, content in files.items():
        (workdir / name).write_text(content)
    cli = workdir.parent / f"{workdir.name}.tfrc"
    cli.write_text(setup.cli_config)
    cli.chmod(0o644)
    mounts = [arg for run_path, host_path in setup.mounts.items() for arg in ("-v", f"{host_path}:{run_path}:ro")]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", "65534:65534", "--read-only",
         "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
         "-e", "CHECKPOINT_DISABLE=1", "-e", "TF_CLI_CONFIG_FILE=/tfdeploy/cli.tfrc",
         "-v", f"{cli}:/tfdeploy/cli.tfrc:ro", *mounts, "-v", f"{workdir}:/work", "-w", "/work",
         "--entrypoint", "sh", image, "-c",
         "terraform init -input=false -no-color && terraform apply -auto-approve -input=false -no-color"],
        capture_output=True, text=True, timeout=180,
    )


# ------------------------------------------------------------------ pure parts


def test_provider_addresses():
    assert str(Provider.parse("hashicorp/null")) == "registry.terraform.io/hashicorp/null"
    assert str(Provider.parse("null")) == "registry.terraform.io/hashicorp/null"
    assert str(Provider.parse("Example.COM:443/Corp/Thing")) == "example.com/corp/thing"
    assert str(Provider.parse("example.com:8443/corp/thing")) == "example.com:8443/corp/thing"
    for bad in ("", "a/b/c/d", 'x"/y', "a/../b", "host/ns/ty pe", "/ns/type", "ns/${x}"):
        assert Provider.parse(bad) is None, bad
    assert Provider.parse("terraform.io/builtin/terraform").builtin  # type: ignore[union-attr]


def test_requirements_of_a_configuration():
    files = {
        "main.tf": """
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = ">= 2.1" }
    ncloud = { source = "NaverCloudPlatform/ncloud" }
    old = "~> 1.0"
  }
}
resource "null_resource" "a" {}
resource "ncloud_server" "s" { provider = ncloud.seoul }
resource "terraform_data" "t" {}
data "http" "page" { url = "https://example.com" }
provider "google" {}
resource "random_pet" "p" {
  provider = random.other
}
""",
        "modules/net/main.tf": """
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "< 3.0" }
  }
}
resource "aws_vpc" "v" {}
""",
        "extra.tf.json": json.dumps({"resource": {"tls_private_key": {"k": {"provider": "tls.x"}}}}),
    }
    req = config_requirements(files).providers
    by_name = {str(p): c for p, c in req.items()}
    assert by_name == {
        "registry.terraform.io/hashicorp/null": {">= 2.1", "< 3.0"},
        "registry.terraform.io/navercloudplatform/ncloud": set(),
        "registry.terraform.io/hashicorp/old": {"~> 1.0"},
        "registry.terraform.io/hashicorp/http": set(),
        "registry.terraform.io/hashicorp/google": set(),
        "registry.terraform.io/hashicorp/random": set(),
        "registry.terraform.io/hashicorp/aws": set(),
        "registry.terraform.io/hashicorp/tls": set(),
    }


def test_requirements_imply_nothing_when_required_providers_cannot_be_read():
    # A source with an interpolation is not a plain string: nothing is guessed for the module
    # (hashicorp/<name> could be the wrong provider), but what was declared plainly counts.
    files = {"main.tf": """
terraform {
  required_providers {
    null = { source = "hashicorp/null" }
    odd  = { source = "${var.x}/odd" }
  }
}
resource "aws_instance" "x" {}
"""}
    assert {str(p) for p in config_requirements(files).providers} == {NULL_ADDRESS}
    # Over the parse budget: the block is not read at all, nothing implied either.
    assert config_requirements({"main.tf": files["main.tf"]}, parse_budget=1).providers == {}


def test_lock_file_round_trip_and_refusals():
    text = render_lock_file([
        LockEntry(NULL, "2.1.2", ">= 2.1.0", ("zh:" + "a" * 64, "h1:" + "B" * 43 + "=")),
    ])
    entries = parse_lock_file(text)
    assert entries[NULL] == LockEntry(NULL, "2.1.2", ">= 2.1.0", ("h1:" + "B" * 43 + "=", "zh:" + "a" * 64))
    assert parse_lock_file(render_lock_file(entries.values())) == entries
    for bad in (
        'provider "registry.terraform.io/hashicorp/null" {\n  version = "two"\n}\n',
        'provider "hashicorp/null" {\n  version = "2.1.2"\n}\n',  # not fully qualified
        'provider "registry.terraform.io/hashicorp/null" {\n  version = "2.1.2"\n  hashes = ["md5:x"]\n}\n',
        'provider "registry.terraform.io/hashicorp/null" {\n  version = "${x}"\n}\n',
        "provider {",
    ):
        with pytest.raises(LockFileError):
            parse_lock_file(bad)


def test_mirror_scan_both_layouts(tmp_path, null_binary):
    build_mirror(tmp_path / "unpacked", layout="unpacked", versions=(NULL_VERSION, NULL_RELABELLED))
    build_mirror(tmp_path / "packed", layout="packed", versions=(NULL_VERSION,))
    (tmp_path / "packed" / "registry.terraform.io" / "hashicorp" / "null" / "README").write_text("ignored")
    unpacked = scan(tmp_path / "unpacked")
    assert [(str(p.provider), p.version, p.platform, p.packed) for p in unpacked] == [
        (NULL_ADDRESS, NULL_VERSION, PLATFORM, False),
        (NULL_ADDRESS, NULL_RELABELLED, PLATFORM, False),
    ]
    packed = scan(tmp_path / "packed")
    assert [(p.version, p.packed) for p in packed] == [(NULL_VERSION, True)]
    assert providers_for(tmp_path / "packed", PLATFORM) == {NULL}
    assert providers_for(tmp_path / "packed", "darwin_arm64") == set()
    assert scan(tmp_path / "absent") == []


def test_operator_cli_config(tmp_path):
    hcl = tmp_path / "op.tfrc"
    hcl.write_text("""
provider_installation {
  network_mirror {
    url     = "https://mirror.example/providers/"
    include = ["registry.terraform.io/*/*"]
  }
  filesystem_mirror {
    path = "/srv/providers"
  }
  direct {
    exclude = ["registry.terraform.io/*/*"]
  }
}
credentials "app.terraform.io" { token = "secret" }
""")
    methods = operator_methods({"TF_CLI_CONFIG_FILE": str(hcl)})
    assert methods == [
        Method("network_mirror", "https://mirror.example/providers/", ("registry.terraform.io/*/*",)),
        Method("filesystem_mirror", "/srv/providers"),
        Method("direct", None, (), ("registry.terraform.io/*/*",)),
    ]
    rendered = render(m.excluding([NULL_ADDRESS]) for m in methods)
    assert "secret" not in rendered and "credentials" not in rendered
    assert 'exclude = ["registry.terraform.io/*/*", "registry.terraform.io/hashicorp/null"]' in rendered
    as_json = tmp_path / "op.tfrc.json"
    as_json.write_text(json.dumps({"provider_installation": {"direct": {"exclude": ["a/b"]}}}))
    assert operator_methods({"TF_CLI_CONFIG_FILE": str(as_json)}) == [Method("direct", None, (), ("a/b",))]
    # Terraform's implied methods when nothing is configured (a missing file counts as none):
    # the local plugin directories that exist, then direct for what they do not hold.
    nothing = {"HOME": str(tmp_path / "nobody"), "XDG_DATA_DIRS": str(tmp_path / "none"),
               "TF_CLI_CONFIG_FILE": str(tmp_path / "missing.tfrc")}
    assert operator_methods(nothing) == [Method("direct")]
    plugins = tmp_path / "home" / ".terraform.d" / "plugins"
    (plugins / NULL_ADDRESS / NULL_VERSION / PLATFORM).mkdir(parents=True)
    (plugins / NULL_ADDRESS / NULL_VERSION / PLATFORM / "terraform-provider-null").write_text("")
    assert operator_methods({"HOME": str(tmp_path / "home"), "XDG_DATA_DIRS": str(tmp_path / "none")}) == [
        Method("filesystem_mirror", str(plugins)),
        Method("direct", None, (), (NULL_ADDRESS,)),
    ]
    twice = tmp_path / "twice.tfrc"
    twice.write_text("provider_installation {\n  direct {}\n}\nprovider_installation {\n  direct {}\n}\n")
    with pytest.raises(CliConfigError):
        operator_methods({"TF_CLI_CONFIG_FILE": str(twice)})
    plain = tmp_path / "plain.tfrc"
    plain.write_text('provider_installation {\n  network_mirror {\n    url = "http://insecure/"\n  }\n}\n')
    with pytest.raises(CliConfigError):
        operator_methods({"TF_CLI_CONFIG_FILE": str(plain)})
    with pytest.raises(CliConfigError):
        render([Method("filesystem_mirror", '/x" }\n direct {')])


def test_lock_file_is_an_accepted_input():
    def request(files: dict[str, str]) -> None:
        parse_deploy_request(json.dumps({"files": files}).encode())

    lock = render_lock_file([LockEntry(NULL, "2.1.2", None, ("h1:" + "A" * 43 + "=",))])
    request({"main.tf": null_config(), ".terraform.lock.hcl": lock})
    for files, status in (
        ({"main.tf": "", "mod/.terraform.lock.hcl": lock}, 422),  # only at the top level
        ({"main.tf": "", ".terraform.lock": lock}, 422),  # exactly that name
        ({"main.tf": "", ".terraformrc": lock}, 422),  # other hidden files still refused
        ({"main.tf": "", ".terraform.lock.hcl": 'provider "x" {'}, 422),  # HCL checked
        ({"main.tf": "", ".terraform.lock.hcl": "# x\n" * 40_000}, 413),  # size-limited
    ):
        with pytest.raises(InvalidRequest) as info:
            request(files)
        assert info.value.status_code == status, files.keys()


# ------------------------------------------------------------------ terraform's own view


@needs_terraform
def test_h1_hash_matches_terraforms(tmp_path, null_binary):
    mirror = build_mirror(tmp_path / "mirror")
    setup = ProviderSetup(
        cli_config=render([Method("filesystem_mirror", str(mirror), (NULL_ADDRESS,))]),
    )
    done = run_offline(tmp_path / "w", setup, {"main.tf": null_config()}, commands=("init",))
    assert done.returncode == 0, done.stderr
    recorded = parse_lock_file((tmp_path / "w" / ".terraform.lock.hcl").read_text())[NULL].hashes
    assert hash_dir(mirror / NULL_ADDRESS / NULL_VERSION / PLATFORM) in recorded
    assert zip_hashes(null_zip())[0] == hash_dir(mirror / NULL_ADDRESS / NULL_VERSION / PLATFORM)


@needs_terraform
@pytest.mark.parametrize("layout", ["unpacked", "packed"])
async def test_mirror_installs_with_no_network(tmp_path, null_binary, layout):
    mirror = build_mirror(tmp_path / "mirror", layout=layout)
    providers = providers_for_test(tmp_path, mirror=mirror)
    prepared = await providers.setup({"main.tf": null_config()}, None)
    assert prepared.setup.mounts == {MIRROR_PATH: str(mirror)}  # nothing cached: nothing to fetch
    assert f'path    = "{MIRROR_PATH}"' in prepared.setup.cli_config
    assert f'exclude = ["{NULL_ADDRESS}"]' in prepared.setup.cli_config  # never from the network
    assert prepared.notes == [f"{NULL_ADDRESS}: from the provider mirror"]
    done = run_offline(tmp_path / "w", prepared.setup, {"main.tf": null_config()})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Apply complete! Resources: 1 added" in done.stdout
    assert locked_version(tmp_path / "w") == NULL_VERSION
    assert not any((tmp_path / "cache" / "providers").iterdir())


@needs_terraform
async def test_a_lock_file_keeps_the_older_of_two_mirrored_versions(tmp_path, null_binary):
    mirror = build_mirror(tmp_path / "mirror", versions=(NULL_VERSION, NULL_RELABELLED))
    providers = providers_for_test(tmp_path, mirror=mirror)
    files = {"main.tf": null_config(">= 2.1")}
    prepared = await providers.setup(files, None)
    fresh = run_offline(tmp_path / "fresh", prepared.setup, files)
    assert fresh.returncode == 0, fresh.stderr
    assert locked_version(tmp_path / "fresh") == NULL_RELABELLED  # the newest, with no lock file

    first = run_offline(tmp_path / "first", prepared.setup, {"main.tf": null_config("= 2.1.2")})
    assert first.returncode == 0, first.stderr
    kept = (tmp_path / "first" / ".terraform.lock.hcl").read_text()
    again = await providers.setup(files, kept)
    assert again.lock_file == kept
    second = run_offline(tmp_path / "second", again.setup, files, lock_file=again.lock_file)
    assert second.returncode == 0, second.stderr
    assert locked_version(tmp_path / "second") == NULL_VERSION


# ------------------------------------------------------------------ the cache


@needs_terraform
async def test_four_runs_on_a_cold_cache_download_once(tmp_path, network_mirror, null_binary):
    providers = providers_for_test(tmp_path, environ=operator_env(tmp_path, network_mirror))
    files = {"main.tf": null_config("~> 2.1.0")}
    prepared = await asyncio.gather(*(providers.setup(files, None) for _ in range(4)))
    assert network_mirror.total_downloads == 1, network_mirror.downloads
    assert sum(len(p.fetched) for p in prepared) == 1
    # One resolution for the four: the others waited for it and took its answer.
    assert network_mirror.requests[f"/{NULL_ADDRESS}/index.json"] == 1
    for p in prepared:
        assert p.setup.mounts == {CACHE_PATH: str(tmp_path / "cache" / "providers")}
        assert f'exclude = ["{NULL_ADDRESS}"]' in p.setup.cli_config
    # The runs themselves: offline, all at once, from the read-only cache.
    runs = await asyncio.gather(*(
        asyncio.to_thread(run_offline, tmp_path / f"run{i}", p.setup, files) for i, p in enumerate(prepared)
    ))
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    assert locked_version(tmp_path / "run0") == NULL_RELABELLED
    assert network_mirror.total_downloads == 1

    # Later runs, with or without the lock file the first left: no download.
    lock = (tmp_path / "run0" / ".terraform.lock.hcl").read_text()
    later = await asyncio.gather(providers.setup(files, None), providers.setup(files, lock))
    assert network_mirror.total_downloads == 1
    assert [p.fetched for p in later] == [[], []]
    # With the lock file the version is known: not even the mirror's index is asked.
    asked = sum(network_mirror.requests.values())
    await providers.setup(files, lock)
    assert sum(network_mirror.requests.values()) == asked
    # The cache holds the package once: unpacked, the size of the provider.
    cached = tmp_path / "cache" / "providers" / NULL_ADDRESS / NULL_RELABELLED / PLATFORM
    assert [p.name for p in cached.iterdir()] == [null_binary.name]
    assert not list((tmp_path / "cache" / "staging").iterdir())


FILL_IN_ANOTHER_PROCESS = """
import asyncio, json, sys
from service.providers import Providers
from service.settings import from_env
settings = from_env({}, data_dir=sys.argv[1], provider_cache=sys.argv[2])
prepared = asyncio.run(Providers(settings, environ=json.loads(sys.argv[3])).setup({"main.tf": sys.argv[4]}, None))
print(json.dumps(prepared.fetched))
"""


@needs_terraform
async def test_worker_processes_on_one_host_share_one_download(tmp_path, network_mirror):
    """The flock is the host's: three worker processes filling at once, one download."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path / "home"),
           "XDG_DATA_DIRS": str(tmp_path / "none"), **operator_env(tmp_path, network_mirror)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", FILL_IN_ANOTHER_PROCESS, str(tmp_path / f"data{i}"), str(tmp_path / "cache"),
            json.dumps(env), null_config(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for i in range(3)
    ]
    outputs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-2000:] for _, err in outputs]
    fetched = [json.loads(out) for out, _ in outputs]
    assert sorted(len(f) for f in fetched) == [0, 0, 1], fetched
    assert network_mirror.total_downloads == 1


@needs_terraform
async def test_a_lock_file_from_elsewhere_is_checked_and_completed(tmp_path, network_mirror):
    """A lock file made on another platform lists that platform's h1: and the zips' zh:
    hashes. The fill checks the download against them; terraform checks an unpacked package
    against h1: hashes only, so the cached package's h1: is added, as terraform itself would
    on installing it."""
    providers = providers_for_test(tmp_path, environ=operator_env(tmp_path, network_mirror))
    zh = zip_hashes(null_zip())[1]
    foreign = LockEntry(NULL, NULL_VERSION, ">= 2.1.0", (zh, "h1:" + "D" * 43 + "="))
    lock = render_lock_file([foreign])
    files = {"main.tf": null_config()}
    prepared = await providers.setup(files, lock)
    assert prepared.fetched == [f"{NULL_ADDRESS} {NULL_VERSION}"]
    assert prepared.lock_file is not None and prepared.lock_file != lock
    completed = parse_lock_file(prepared.lock_file)[NULL]
    assert set(foreign.hashes) < set(completed.hashes)
    run = run_offline(tmp_path / "w", prepared.setup, files, lock_file=prepared.lock_file)
    assert run.returncode == 0, run.stdout + run.stderr

    # A lock file whose hashes describe another package: not fetched, not cached; the run's
    # own init reports it (the mirror is still its source: it has the network).
    wrong = render_lock_file([LockEntry(NULL, NULL_RELABELLED, None, ("zh:" + "0" * 64,))])
    refused = await providers.setup(files, wrong)
    assert refused.setup.mounts == {}
    assert any("not cached" in n and "checksum" in n for n in refused.notes), refused.notes
    assert not (tmp_path / "cache" / "providers" / NULL_ADDRESS / NULL_RELABELLED).exists()


@needs_terraform
async def test_unreachable_source_leaves_the_provider_to_the_run(tmp_path, null_binary):
    config = tmp_path / "op.tfrc"
    config.write_text(network_mirror_cli_config("https://127.0.0.1:9/"))
    providers = providers_for_test(tmp_path, environ={"TF_CLI_CONFIG_FILE": str(config)})
    started = time.monotonic()
    prepared = await providers.setup({"main.tf": null_config()}, None)
    assert time.monotonic() - started < 60
    assert prepared.setup.mounts == {}
    assert prepared.notes and "not cached" in prepared.notes[0]
    assert 'url     = "https://127.0.0.1:9/"' in prepared.setup.cli_config  # the run may try itself
    # The failure is remembered for a while: the next deploys do not wait for it in turn.
    started = time.monotonic()
    again = await asyncio.gather(*(providers.setup({"main.tf": null_config()}, None) for _ in range(3)))
    assert time.monotonic() - started < 5
    assert all("ago" in p.notes[0] for p in again), [p.notes for p in again]


@needs_terraform
async def test_operators_local_plugins_reach_runs_through_the_cache(tmp_path, null_binary):
    """Terraform's implied local plugin directory (no provider_installation block): fills take
    the provider from it; terraform links it there, so the cache copies it (runs cannot see the
    operator's directories) and runs read the copy."""
    plugins = build_mirror(tmp_path / "home" / ".terraform.d" / "plugins")
    providers = providers_for_test(tmp_path)
    prepared = await providers.setup({"main.tf": null_config()}, None)
    assert prepared.fetched == [f"{NULL_ADDRESS} {NULL_VERSION}"], prepared.notes
    cached = tmp_path / "cache" / "providers" / NULL_ADDRESS / NULL_VERSION / PLATFORM
    assert cached.is_dir() and not cached.is_symlink()
    assert (plugins / NULL_ADDRESS / NULL_VERSION / PLATFORM / null_binary.name).is_file()
    assert "direct" in prepared.setup.cli_config and str(plugins) not in prepared.setup.cli_config
    run = run_offline(tmp_path / "w", prepared.setup, {"main.tf": null_config()})
    assert run.returncode == 0, run.stdout + run.stderr


@needs_terraform
async def test_fills_contact_only_allowed_registry_hosts(tmp_path, null_binary):
    """A configuration names the provider's host; the worker's host installs directly only from
    TFDEPLOY_PROVIDER_DIRECT_HOSTS (default: the public registry)."""
    files = {"main.tf": 'terraform {\n  required_providers {\n    t = { source = "10.0.0.1:8443/corp/thing" }\n  }\n}\n'}
    providers = providers_for_test(tmp_path)
    started = time.monotonic()
    prepared = await providers.setup(files, None)
    assert time.monotonic() - started < 5  # no terraform run, no connection attempt
    assert "TFDEPLOY_PROVIDER_DIRECT_HOSTS" in prepared.notes[0], prepared.notes
    assert not list((tmp_path / "cache" / "staging").iterdir())
    # Through the operator's own mirror any host is fine: the mirror is contacted, not the host.
    cache = ProviderCache(tmp_path / "c2", terraform="terraform", platform=PLATFORM, environ={},
                          methods=[Method("network_mirror", "https://mirror.example/"), Method("direct")],
                          direct_hosts=["registry.terraform.io"])
    thing = Provider.parse("10.0.0.1:8443/corp/thing")
    assert thing is not None
    assert [m.kind for m in cache.methods_for(thing)] == ["network_mirror"]
    assert [m.kind for m in cache.methods_for(NULL)] == ["network_mirror", "direct"]


async def test_cache_lookup_hashes_a_package_put_there_by_hand(tmp_path, null_binary):
    cache = ProviderCache(tmp_path / "cache", terraform="terraform", platform=PLATFORM, methods=[], environ={})
    target = cache.package_dir(NULL, NULL_VERSION)
    target.mkdir(parents=True)
    shutil.copy2(null_binary, target / null_binary.name)
    found = cache.lookup(NULL, NULL_VERSION)
    assert isinstance(found, Cached)
    assert found.h1 == zip_hashes(null_zip())[0] and found.size == null_binary.stat().st_size
    assert cache.versions(NULL) == [NULL_VERSION]
    # terraform's rule for unpacked packages: only h1: hashes are checked; zh: alone passes.
    assert found.compatible(LockEntry(NULL, NULL_VERSION, None, ("zh:" + "0" * 64,)))
    assert not found.compatible(LockEntry(NULL, NULL_VERSION, None, ("h1:" + "0" * 43 + "=",)))
    assert not found.compatible(LockEntry(NULL, NULL_RELABELLED, None, ()))


# ------------------------------------------------------------------ Docker: the runner image


@pytest.mark.docker
@needs_terraform
async def test_docker_runs_from_read_only_mirror_and_cache(tmp_path, runner_image, network_mirror):
    if not docker_ready(runner_image):
        pytest.skip(f"no Docker engine answers (or image {runner_image} is missing)")
    mirror = build_mirror(tmp_path / "mirror", layout="packed")
    providers = providers_for_test(tmp_path, mirror=mirror)
    prepared = await providers.setup({"main.tf": null_config()}, None)
    run = await asyncio.to_thread(run_in_docker, runner_image, tmp_path / "m", prepared.setup, {"main.tf": null_config()})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Apply complete! Resources: 1 added" in run.stdout

    cached = providers_for_test(tmp_path / "c", environ=operator_env(tmp_path, network_mirror))
    prepared = await cached.setup({"main.tf": null_config()}, None)
    assert CACHE_PATH in prepared.setup.mounts
    run = await asyncio.to_thread(run_in_docker, runner_image, tmp_path / "c" / "w", prepared.setup, {"main.tf": null_config()})
    assert run.returncode == 0, run.stdout + run.stderr
    assert network_mirror.total_downloads == 1


# ------------------------------------------------------------------ lock files kept


async def test_lock_files_kept_with_state_versions(pool):
    from service.statestores import index
    from service.statestores.base import StoredState

    async def version(workspace: str, n: int, lock: bytes | None) -> None:
        async with pool.connection() as conn, conn.transaction():
            await index.next_version(conn, workspace)
            stored = StoredState(store="postgres", location=f"postgres:{workspace}/{n}")
            await index.record_version(
                conn, workspace, n, "00000000-0000-0000-0000-000000000001", 1, stored, n, "l", "s" * 64, 10
            )
            if lock is not None:
                assert await lockfiles.save(conn, workspace, n, lock)

    async with pool.connection() as conn:
        assert await lockfiles.latest(conn, "ws") is None
    await version("ws", 1, b"# one\n")
    await version("ws", 2, None)  # a failed attempt's state: no lock file
    await version("other", 1, b"# other\n")
    async with pool.connection() as conn:
        assert await lockfiles.latest(conn, "ws") == "# one\n"
        assert not await lockfiles.save(conn, "ws", 2, b"\xff\xfe")  # not UTF-8: not kept
    await version("ws", 3, b"# three\n")
    async with pool.connection() as conn:
        assert await lockfiles.latest(conn, "ws") == "# three\n"
        await conn.execute("DELETE FROM state_versions WHERE workspace = 'ws' AND version = 3")
        assert await lockfiles.latest(conn, "ws") == "# one\n"  # went with its version


def test_a_deploys_own_lock_file_wins():
    assert lockfiles.lock_for_run({"main.tf": ""}, "kept") == "kept"
    assert lockfiles.lock_for_run({"main.tf": "", ".terraform.lock.hcl": "own"}, "kept") == "own"
    assert lockfiles.lock_for_run({"main.tf": ""}, None) is None
    assert lockfiles.from_result(RunResult(exit_code=0, state=None)) is None


async def test_run_inputs_carry_the_lock_file(tmp_path):
    providers = providers_for_test(tmp_path)
    files = {"main.tf": 'resource "terraform_data" "x" {}\n'}
    inputs = await providers.run_inputs({**files, ".terraform.lock.hcl": "# own\n"}, "# kept\n")
    assert inputs["lock_file"] == b"# own\n"  # the deploy's own lock file wins
    assert inputs["files"] == files  # and goes to the run as the lock file, not a file
    inputs = await providers.run_inputs(files, "# kept\n")
    assert inputs["lock_file"] == b"# kept\n" and inputs["files"] == files
    RunRequest(deploy_id="d", attempt=1, workspace="w", steps=[], **inputs)


# ------------------------------------------------------------------ deploys end to end


RUNNER_KINDS = [pytest.param("local", id="local"), pytest.param("docker", id="docker", marks=pytest.mark.docker)]


@contextlib.asynccontextmanager
async def deploying(database_url, tmp_path, runner_kind, runner_image, environ=None, **overrides):
    from service.api.app import create_app
    from service.auth import create_token
    from service.runners import docker_available
    from service.services import open_services
    from service.worker import Worker

    if runner_kind == "docker" and not docker_available():
        pytest.skip("no Docker engine")
    values = dict(
        data_dir=str(tmp_path / "data"), runner=runner_kind, runner_image=runner_image,
        runner_network="none", retry_delay=0.05, max_concurrency=4,
        provider_cache=str(tmp_path / "cache"),
    )
    values.update(overrides)
    settings = from_env({}, **values)
    services = await open_services(settings, database_url)
    runner = None
    if runner_kind == "docker":
        import secrets

        from service.runners.docker import DockerRunner

        # A label value of its own: the engine's cap is shared with other tests and sessions.
        runner = DockerRunner(settings, service_name=f"tfdeploy-test-{secrets.token_hex(4)}")
    worker = Worker(services, name="providers-test", runner=runner)
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path / "home"),
           "XDG_DATA_DIRS": str(tmp_path / "no-data-dirs"), **(environ or {})}
    worker.deployer.providers = Providers(settings, environ=env)
    task = asyncio.create_task(worker.run())
    async with services.pool.connection() as conn:
        token = await create_token(conn, "ann")
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        try:
            yield client
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
            await worker.close()
            await services.close()


async def deploy(client: httpx.AsyncClient, files: dict[str, str], workspace: str, timeout: float = 120) -> dict:
    r = await client.post("/deploys", json={"files": files, "workspace": workspace, "max_attempts": 1})
    assert r.status_code == 202, r.text
    deploy_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = (await client.get(f"/deploys/{deploy_id}")).json()
        if d["status"] in ("succeeded", "failed", "cancelled"):
            d["logs"] = (await client.get(f"/deploys/{deploy_id}/logs")).text
            return d
        await asyncio.sleep(0.1)
    raise AssertionError(f"deploy {deploy_id} did not end in {timeout}s")


@needs_runners
@pytest.mark.parametrize("runner_kind", RUNNER_KINDS)
async def test_four_deploys_cold_cache_one_download(database_url, tmp_path, runner_kind, runner_image, network_mirror):
    files = {"main.tf": null_config("~> 2.1.0")}
    async with deploying(database_url, tmp_path, runner_kind, runner_image,
                         environ=operator_env(tmp_path, network_mirror)) as client:
        done = await asyncio.gather(*(deploy(client, files, f"ws{i}") for i in range(4)))
        assert [d["status"] for d in done] == ["succeeded"] * 4, [d["logs"][-2000:] for d in done]
        assert network_mirror.total_downloads == 1
        again = await asyncio.gather(*(deploy(client, files, f"ws{i}") for i in range(4)))
        assert [d["status"] for d in again] == ["succeeded"] * 4
        assert network_mirror.total_downloads == 1


@needs_runners
@pytest.mark.parametrize("runner_kind", RUNNER_KINDS)
async def test_deploy_from_the_mirror_with_network_none(database_url, tmp_path, runner_kind, runner_image, null_binary):
    mirror = build_mirror(tmp_path / "mirror", layout="unpacked")
    async with deploying(database_url, tmp_path, runner_kind, runner_image, provider_mirror=str(mirror)) as client:
        done = await deploy(client, {"main.tf": null_config()}, "offline")
        assert done["status"] == "succeeded", done["logs"][-3000:]


@needs_runners
@pytest.mark.parametrize("runner_kind", RUNNER_KINDS)
async def test_workspace_keeps_the_older_version(database_url, tmp_path, runner_kind, runner_image, null_binary):
    mirror = build_mirror(tmp_path / "mirror", versions=(NULL_VERSION, NULL_RELABELLED))
    async with deploying(database_url, tmp_path, runner_kind, runner_image, provider_mirror=str(mirror)) as client:
        first = await deploy(client, {"main.tf": null_config("= 2.1.2")}, "kept")
        assert first["status"] == "succeeded", first["logs"][-3000:]
        # The constraint now allows the newer version; the kept lock file holds the older one.
        second = await deploy(client, {"main.tf": null_config(">= 2.1")}, "kept")
        assert second["status"] == "succeeded", second["logs"][-3000:]
        assert "v2.1.2" in second["logs"] and "v2.1.3" not in second["logs"]
        # Another workspace has no lock file: it gets the newest.
        other = await deploy(client, {"main.tf": null_config(">= 2.1")}, "fresh")
        assert "v2.1.3" in other["logs"]
