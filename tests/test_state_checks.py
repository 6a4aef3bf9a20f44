"""What a run leaves is checked before it is trusted (issue 12.2, CONTRACT "Limits").

Pure checks first (the shape of a tfstate, the file checks on a descriptor, Docker's path
stat), then hostile configurations end to end, through a real worker on both runners: a state
replaced with a link to /dev/null, with garbage, with 70 MB -- each deploy ends ``failed`` with
reason ``state_invalid``, never stays ``deploying``, and the workspace keeps its last good state.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from test_execution import RUNNERS, harness

from service.runners.statecheck import (
    ArtifactProblem,
    docker_stat_problem,
    read_local_artifact,
    state_shape_problem,
)

GOOD = json.dumps({
    "version": 4, "terraform_version": "1.11.4", "serial": 3, "lineage": "abc",
    "outputs": {"x": {"value": 1, "type": "number"}},
    "resources": [{"mode": "managed", "type": "terraform_data", "name": "a",
                   "provider": "provider[\"terraform.io/builtin/terraform\"]",
                   "instances": [{"attributes": {"id": "1", "input": {"deep": [[[1]]]}}}]}],
    "check_results": None,
}).encode()


# ---------------------------------------------------------------- the shape of a tfstate


def test_a_real_state_passes():
    assert state_shape_problem(GOOD) is None


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"garbage-not-a-state\n", "not JSON"),
        (b"[]", "not a tfstate"),
        (b'{"version": 3, "serial": 1, "lineage": "x"}', "not a tfstate"),
        (b'{"version": 4, "serial": -1, "lineage": "x"}', "not a tfstate"),
        (b'{"version": 4, "serial": 1' + b"0" * 40 + b', "lineage": "x"}', "not a tfstate"),
        (b'{"version": 4, "serial": 1, "lineage": "x", "resources": {}}', "not a tfstate"),
        (b'{"version": 4, "serial": 1, "lineage": "x", "resources": [' + b"[" * 100_000
         + b"]" * 100_000 + b"]}", ""),
        (b'{"version": 4, "serial": 1, "lineage": "' + b"x" * 1000 + b'"}', "not a tfstate"),
        (b"\xff\xfe garbage", "not JSON"),
    ],
    ids=["empty", "blank", "garbage", "array", "version 3", "negative serial", "huge serial",
         "resources not a list", "deep nesting", "long lineage", "binary"],
)
def test_what_is_not_a_tfstate_is_refused(content, why):
    problem = state_shape_problem(content)
    assert problem is not None
    assert why in problem


def test_deep_nesting_inside_an_attribute_is_refused_not_a_crash():
    deep = b"[" * 200_000 + b"]" * 200_000
    content = GOOD.replace(b'[[[1]]]', deep)
    assert state_shape_problem(content) is not None


def test_huge_numbers_inside_attributes_are_skipped_cheaply():
    """Nested values are skipped, not built: a million-digit number costs no time."""
    content = GOOD.replace(b'[[[1]]]', b"1" * 1_000_000)
    started = time.monotonic()
    assert state_shape_problem(content) is None
    assert time.monotonic() - started < 0.5


# ---------------------------------------------------------------- files the run left


def test_a_regular_file_is_read(tmp_path):
    (tmp_path / "s").write_bytes(GOOD)
    assert read_local_artifact(tmp_path / "s", 1 << 20) == GOOD
    assert read_local_artifact(tmp_path / "missing", 1 << 20) is None


def test_a_link_is_refused_even_to_a_good_file(tmp_path):
    (tmp_path / "real").write_bytes(GOOD)
    (tmp_path / "s").symlink_to(tmp_path / "real")
    with pytest.raises(ArtifactProblem, match="symbolic link"):
        read_local_artifact(tmp_path / "s", 1 << 20)
    (tmp_path / "n").symlink_to("/dev/null")
    with pytest.raises(ArtifactProblem, match="symbolic link"):
        read_local_artifact(tmp_path / "n", 1 << 20)


def test_a_fifo_a_directory_and_a_hard_link_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it must not block
    with pytest.raises(ArtifactProblem, match="not a regular file"):
        read_local_artifact(tmp_path / "fifo", 1 << 20)
    (tmp_path / "dir").mkdir()
    with pytest.raises(ArtifactProblem, match="not a regular file"):
        read_local_artifact(tmp_path / "dir", 1 << 20)
    (tmp_path / "real").write_bytes(GOOD)
    os.link(tmp_path / "real", tmp_path / "linked")
    with pytest.raises(ArtifactProblem, match="hard link"):
        read_local_artifact(tmp_path / "linked", 1 << 20)


def test_the_size_is_checked_before_reading(tmp_path):
    # A sparse 20 GB file: refused at once, nothing read.
    with open(tmp_path / "big", "wb") as f:
        f.truncate(20 * 2**30)
    started = time.monotonic()
    with pytest.raises(ArtifactProblem, match="over the limit"):
        read_local_artifact(tmp_path / "big", 64 * 2**20)
    assert time.monotonic() - started < 0.1


def test_docker_path_stat_is_checked():
    ok = {"name": "terraform.tfstate", "size": 10, "mode": 0o600, "linkTarget": ""}
    assert docker_stat_problem(ok, 100) is None
    assert "over the limit" in docker_stat_problem({**ok, "size": 101}, 100)
    assert "symbolic link" in docker_stat_problem({**ok, "mode": 1 << 27 | 0o777,
                                                   "linkTarget": "/dev/null"}, 100)
    assert "directory" in docker_stat_problem({**ok, "mode": 1 << 31 | 0o755}, 100)
    assert "named pipe" in docker_stat_problem({**ok, "mode": 1 << 25 | 0o644}, 100)
    assert "unknown" in docker_stat_problem({"size": 1}, 100)


def test_a_refused_state_fails_the_deploy_at_once_with_state_invalid():
    """The deployer reports a refused state with StateNotPersisted(reason="state_invalid");
    the lifecycle ends the deploy whatever its budget (a retry would start from the last good
    state and make again what this run made)."""
    from service.events import Requested, Started
    from service.lifecycle import StateNotPersisted, decide, fold

    state = fold([
        Requested(workspace="w", action="apply", max_attempts=3, owner="ann", files={}),
        Started(attempt=1),
    ])
    events = decide(StateNotPersisted(reason="state_invalid", message="x", destroyed=False), state)
    assert [(type(e).__name__, e.reason, e.final) for e in events] == [("Failed", "state_invalid", True)]  # type: ignore[union-attr]


# ---------------------------------------------------------------- hostile configurations

A_THEN = """
resource "terraform_data" "a" {
  provisioner "local-exec" { command = "echo MADE-A" }
}
resource "terraform_data" "b" {
  depends_on = [terraform_data.a]
  provisioner "local-exec" { command = "%s" }
}
"""
# Terraform keeps writing to the state file it opened; the provisioner puts something else
# where it was. busybox is on PATH in the runner image and on the host.
HOSTILE = {
    "dev-null-link": "rm -f terraform.tfstate; busybox ln -s /dev/null terraform.tfstate",
    "garbage": "rm -f terraform.tfstate; echo garbage-not-a-state > terraform.tfstate",
    "70MB": "rm -f terraform.tfstate; busybox dd if=/dev/zero of=terraform.tfstate bs=1048576 "
            "count=70 2>/dev/null",
}


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("runner_kind", RUNNERS)
async def test_a_replaced_state_ends_the_deploy_failed_state_invalid(
    database_url, tmp_path, runner_kind, runner_image, hostile
):
    async with harness(database_url, tmp_path, runner_kind, runner_image) as h:
        # A good state first: the workspace must keep it.
        first = await h.submit({"main.tf": A_THEN % "echo fine"}, workspace="kept")
        assert (await h.wait(first["id"]))["status"] == "succeeded"
        good = (await h.client.get("/workspaces/kept/state")).json()

        d = await h.submit({"main.tf": A_THEN.replace("terraform_data\" \"b\"", "terraform_data\" \"c\"")
                            % HOSTILE[hostile]}, workspace="kept", max_attempts=1)
        done = await h.wait(d["id"], timeout=180)
        assert done["status"] == "failed", done
        assert done["error"]["reason"] == "state_invalid", done
        events = await h.events(d["id"])
        types = [e["type"] for e in events]
        # what could be read within the limit is rescued (StateRescued); a link or a file
        # over the limit leaves nothing to rescue
        rescued = ["StateRescued"] if hostile == "garbage" else []
        assert types == ["Requested", "Started", *rescued, "Failed"], types
        failed = events[-1]["data"]
        assert failed["reason"] == "state_invalid"
        expected = {
            "dev-null-link": ("no terraform.tfstate", "symbolic link"),
            "garbage": ("not JSON",),
            "70MB": ("over the limit",),
        }[hostile]
        assert any(e in failed["message"] for e in expected), failed["message"]
        log = await h.logs(d["id"])
        assert "state refused" in log
        # Nothing was persisted: the workspace keeps its last good state.
        assert (await h.client.get("/workspaces/kept/state")).json() == good
        if hostile == "garbage":  # what it held was rescued (bounded), for an operator
            assert "kept at" in failed["message"]
            async with h.services.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM state_emergency WHERE deploy_id = %s", (d["id"],))
                assert (await cur.fetchone())[0] == 1
