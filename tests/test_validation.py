"""service.validation (with its HCL scanner, service.hcl_scan): every rule of a POST /deploys body,
the refused and the accepted side."""

from __future__ import annotations

import json
from typing import Any

import hcl2
import msgspec
import pytest

from service import validation as v
from service.hcl_scan import MAX_NESTING, ScanResult, scan_hcl
from service.validation import (
    HCL_PARSE_BUDGET,
    MAX_FILES,
    MAX_VALUE_BYTES,
    SAFE_NAME,
    DeployRequest,
    InvalidRequest,
    body_limit,
    check_file_name,
    parse_deploy_request,
    validate,
)

TYPICAL = """\
terraform {
  required_version = ">= 1.5"
}

variable "greeting" {
  type        = string
  default     = "hello"
  description = "What to say"
}

resource "terraform_data" "hello" {
  input = var.greeting

  provisioner "local-exec" {
    command = "echo ${self.input} > /tmp/out.txt"
  }
}

output "message" {
  value = terraform_data.hello.output
}
"""

MAIN = 'resource "terraform_data" "x" {}\n'


def body(**fields: Any) -> bytes:
    fields.setdefault("files", {"main.tf": MAIN})
    return json.dumps(fields).encode()


def parse(**fields: Any) -> DeployRequest:
    return parse_deploy_request(body(**fields))


def refused(status: int, **fields: Any) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse(**fields)
    assert info.value.status_code == status, info.value.detail
    return info.value.detail


def refused_body(status: int, raw: bytes, max_bytes: int = 1024 * 1024) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_deploy_request(raw, max_bytes)
    assert info.value.status_code == status, info.value.detail
    return info.value.detail


def refused_files(files: dict[str, str], status: int = 422) -> str:
    return refused(status, files=files)


def with_main(extra: dict[str, str]) -> dict[str, str]:
    return {"main.tf": MAIN, **extra}


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    v.warm_up()


# ------------------------------------------------------------------------------------------------
# The request, decoding
# ------------------------------------------------------------------------------------------------


def test_typical_config_is_accepted_with_defaults() -> None:
    req = parse(files={"main.tf": TYPICAL})
    assert req == DeployRequest(files={"main.tf": TYPICAL})
    assert (req.workspace, req.variables, req.secrets, req.action, req.max_attempts) == (
        "default",
        {},
        {},
        "apply",
        None,
    )


def test_full_request_is_accepted() -> None:
    req = parse(
        files={
            "main.tf": TYPICAL,
            "versions.tf": "terraform {\n  required_providers {\n    null = {\n"
            '      source = "hashicorp/null"\n    }\n  }\n}\n',
            "terraform.tfvars": 'greeting = "hi"\n',
            "prod.auto.tfvars": "x = 1\n",
            "extra.tfvars.json": '{"y": 2}',
            "override.tf.json": '{"variable": {"z": {"default": 1}}}',
            "data/config.json": '{"a": [1, 2]}',
            "modules/net/main.tf": 'variable "cidr" {}\noutput "cidr" {\n  value = var.cidr\n}\n',
        },
        workspace="prod-eu_1",
        variables={"greeting": "hi", "_x": "1", "with-dash": "2"},
        secrets={"token": "s3cret"},
        action="destroy",
        max_attempts=10,
    )
    assert req.action == "destroy" and req.max_attempts == 10
    assert req.secrets == {"token": "s3cret"}


def test_accepts_str_and_bytearray_bodies() -> None:
    raw = body()
    assert parse_deploy_request(raw.decode()).files == {"main.tf": MAIN}
    assert parse_deploy_request(bytearray(raw)).files == {"main.tf": MAIN}
    assert parse_deploy_request(memoryview(raw)).files == {"main.tf": MAIN}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"files": {"main.tf": "x"}',
        b'{"files": {}} trailing',
        b"{'files': {}}",
        b"not json",
        b'{"files": {"main.tf": "\\x"}}',
        b'\xef\xbb\xbf{"files": {"main.tf": "x"}}',  # a BOM is not JSON
    ],
)
def test_malformed_json_is_400(raw: bytes) -> None:
    detail = refused_body(400, raw)
    assert "JSON" in detail


@pytest.mark.parametrize(
    "raw",
    [
        b'{"files": {"main.tf": "\xff\xfe"}}',
        b'{"files": {"ma\xc3(in.tf": "x"}}',
        b'{"files": {"main.tf": "\xed\xa0\x80"}}',  # an encoded surrogate
        b'\xff{"files": {}}',
    ],
)
def test_invalid_utf8_is_400(raw: bytes) -> None:
    assert "UTF-8" in refused_body(400, raw)


@pytest.mark.parametrize(
    "raw",
    [b'{"files": {"main.tf": "\\ud800"}}', b'{"files": {"main.tf": "a\\udc00b"}}'],
)
def test_lone_surrogate_escape_is_400(raw: bytes) -> None:
    refused_body(400, raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"files": {"main.tf": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"files": ' + b'{"a":' * 100_000,
        b'{"variables": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
        b'{"zzz": ' + b"[" * 100_000 + b"]" * 100_000 + b', "files": {}}',
        b"[" * 100_000,
    ],
)
def test_deeply_nested_json_body_does_not_crash(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_deploy_request(raw)
    assert info.value.status_code in (400, 422)


def test_unknown_field_is_422_and_named() -> None:
    detail = refused(422, backend="s3")
    assert "backend" in detail and "unknown field" in detail


def test_missing_files_is_422() -> None:
    detail = refused_body(422, b'{"workspace": "w"}')
    assert "files" in detail


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"files": ["main.tf"]}, "files"),
        ({"files": {"main.tf": 1}}, "files"),
        ({"files": {"main.tf": None}}, "files"),
        ({"files": None}, "files"),
        ({"workspace": 1}, "workspace"),
        ({"workspace": None}, "workspace"),
        ({"variables": {"a": 1}}, "variables"),
        ({"variables": {"a": {"b": "c"}}}, "variables"),
        ({"variables": ["a"]}, "variables"),
        ({"secrets": {"a": True}}, "secrets"),
        ({"action": "refresh"}, "action"),
        ({"action": "APPLY"}, "action"),
        ({"action": None}, "action"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 11}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
    ],
)
def test_wrong_types_are_422_and_named(fields: dict[str, Any], named: str) -> None:
    detail = refused(422, **fields)
    assert named in detail


@pytest.mark.parametrize("raw", [b"[]", b'"files"', b"null", b"1", b"true"])
def test_body_must_be_an_object(raw: bytes) -> None:
    refused_body(422, raw)


@pytest.mark.parametrize("attempts", [1, 3, 10, None])
def test_max_attempts_range_accepted(attempts: int | None) -> None:
    assert parse(max_attempts=attempts).max_attempts == attempts


def test_python_built_request_is_checked_too() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(DeployRequest(files={"main.tf": 1}), 1024)  # type: ignore[dict-item]
    assert info.value.status_code == 422
    with pytest.raises(InvalidRequest):
        validate(DeployRequest(files={"main.tf": MAIN}, max_attempts=0), 1024)
    with pytest.raises(InvalidRequest):
        validate(DeployRequest(files={"main.tf": MAIN}, action="refresh"), 1024)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as info:
        validate(DeployRequest(files={"main.tf": "x = \ud800"}), 1024)
    assert info.value.status_code == 422


def test_invalid_request_carries_status_and_detail() -> None:
    exc = InvalidRequest(422, "bad")
    assert (exc.status_code, exc.detail, str(exc)) == (422, "bad", "bad")
    assert exc.to_dict() == {"status_code": 422, "detail": "bad"}
    assert json.loads(msgspec.json.encode(exc.to_dict())) == {"status_code": 422, "detail": "bad"}


# ------------------------------------------------------------------------------------------------
# Sizes and counts
# ------------------------------------------------------------------------------------------------


def test_content_up_to_the_limit_is_accepted_and_one_byte_more_is_413() -> None:
    limit = 4096
    content = MAIN + "#" * (limit - len(MAIN) - 1) + "\n"
    assert len(content) == limit
    assert parse_deploy_request(body(files={"main.tf": content}), limit)
    detail = refused_body(413, body(files={"main.tf": content + "\n"}), limit)
    assert str(limit) in detail


def test_size_counts_utf8_bytes_not_characters() -> None:
    content = MAIN + "# " + "é" * 1500 + "\n"  # 1500 characters, 3000 bytes
    assert len(content) < 2048 < len(content.encode())
    refused_body(413, body(files={"main.tf": content}), 2048)
    assert parse_deploy_request(body(files={"main.tf": content}), 4096)


def test_size_counts_variables_and_secrets() -> None:
    limit = 2048
    assert parse_deploy_request(body(variables={"a": "x" * 1000}), limit)
    refused_body(413, body(variables={"a": "x" * 1010}, secrets={"b": "y" * 1010}), limit)
    refused_body(413, body(secrets={"b": "y" * 2100}), limit)


def test_huge_content_is_413() -> None:
    raw = body(files={"main.tf": MAIN + "#" * (2 * 1024 * 1024)})
    detail = refused_body(413, raw)
    assert "too large" in detail


def test_body_far_over_the_limit_is_413_before_decoding() -> None:
    raw = b'{"files": {"main.tf": "' + b"#" * (body_limit(1024) + 1) + b'"}}'
    assert "body too large" in refused_body(413, raw, 1024)
    # ... even when it is not JSON at all
    refused_body(413, b"x" * (body_limit(1024) + 1), 1024)


def test_json_escaping_does_not_count_against_the_content_limit() -> None:
    content = MAIN + '# "quoted"\n' * 300  # escaping grows the body well past the content
    raw = body(files={"main.tf": content})
    assert len(raw) > 4096 > len(content)
    assert parse_deploy_request(raw, 4096)


def test_one_value_larger_than_an_environment_string_is_413() -> None:
    detail = refused(413, variables={"big": "x" * (MAX_VALUE_BYTES + 1)})
    assert "big" in detail and "x" * 20 not in detail
    assert parse(variables={"big": "x" * MAX_VALUE_BYTES})


def test_at_most_200_files() -> None:
    files = {f"f{i}.tf": "" for i in range(MAX_FILES - 1)} | {"main.tf": MAIN}
    assert len(parse(files=files).files) == MAX_FILES
    files["one-more.tf"] = ""
    assert "too many files" in refused_files(files)


def test_ten_thousand_files_are_refused() -> None:
    files = {f"f{i}.tf": MAIN for i in range(10_000)}
    raw = body(files=files)
    detail = refused_body(422, raw)
    assert "10000" in detail


def test_ten_thousand_files_over_the_size_limit_are_413() -> None:
    files = {f"f{i}.tf": "#" * 200 for i in range(10_000)}
    refused_body(413, body(files=files))


# ------------------------------------------------------------------------------------------------
# Which files
# ------------------------------------------------------------------------------------------------


def test_no_files_is_422() -> None:
    assert "at least one file" in refused_files({})


@pytest.mark.parametrize(
    "files",
    [
        {"terraform.tfvars": "a = 1\n"},
        {"data.json": "{}"},
        {"x.tfvars.json": "{}"},
        {"modules/net/main.tf": MAIN},  # terraform would find no configuration at the top
    ],
)
def test_a_top_level_tf_or_tf_json_file_is_required(files: dict[str, str]) -> None:
    assert ".tf" in refused_files(files)


def test_tf_json_alone_is_enough() -> None:
    assert parse(files={"main.tf.json": '{"resource": {"terraform_data": {"x": {}}}}'})


# ------------------------------------------------------------------------------------------------
# File names
# ------------------------------------------------------------------------------------------------

REFUSED_NAMES = [
    "../x.tf",
    "a/../../x.tf",
    "a/..",
    "..",
    ".",
    "./main.tf",
    "a/./b.tf",
    "/etc/x.tf",
    "/main.tf",
    "a//b.tf",
    "a/b.tf/",
    "modules/",
    ".hidden.tf",
    "a/.hidden/b.tf",
    ".terraform/x.tf",
    "mod/.terraform.lock.hcl",  # the lock file is accepted at the top level only
    "a\\b.tf",
    "..\\x.tf",
    "C:\\x.tf",
    "C:x.tf",
    "a\x00.tf",
    "main.tf\x00.txt",
    "a\n.tf",
    "main.tf\n",
    "a\tb.tf",
    "a\x7f.tf",
    "\u0430.tf",  # Cyrillic a
    "m\u0430in.tf",
    "main\u2024tf",  # one dot leader
    "main.tf\u200b",  # zero-width space
    "\uff4dain.tf",  # fullwidth m
    "ma in.tf",
    "~/x.tf",
    "%2e%2e/x.tf",
    "a?.tf",
    "*.tf",
    "a:b.tf",
    "-rf.tf",
    "a/-x.tf",
    "",
    "main",
    "main.txt",
    "main.hcl",
    "main.TF",
    "main.tf.bak",
    "main.tfvar",
    "terraform.tfstate",
    "terraform.tfstate.backup",
    "x.tfstate.json",
    "state/prod.TFSTATE.json",
    "terraform.tfstate.d/x.tf",
    "a" * 253 + ".tf",  # 256 characters
]


@pytest.mark.parametrize("name", REFUSED_NAMES)
def test_unsafe_file_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_file_name(name)
    assert info.value.status_code == 422
    detail = refused_files(with_main({name: MAIN}))
    assert "file name" in detail


ACCEPTED_NAMES = [
    "main.tf",
    "variables.tf",
    "terraform.tfvars",
    "prod.auto.tfvars",
    "x.tfvars.json",
    "main.tf.json",
    "data.json",
    "modules/net/main.tf",
    "modules/net/v1.2/main.tf",
    "A-b_c.1.tf",
    "_private.tf",
    "0.tf",
    "a/b/c/d/e/f.tf",
    "a" * 252 + ".tf",  # 255 characters
]


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_safe_file_names_are_accepted(name: str) -> None:
    check_file_name(name)
    assert SAFE_NAME.match(name)
    content = "{}" if name.endswith(".json") else ("a = 1\n" if ".tfvars" in name else MAIN)
    assert parse(files=with_main({name: content}))


def test_file_name_messages_name_the_file_visibly() -> None:
    assert "'../x.tf'" in refused_files(with_main({"../x.tf": MAIN}))
    assert "\\u0430" in refused_files(with_main({"\u0430.tf": MAIN}))
    assert "\\x00" in refused_files(with_main({"a\x00.tf": MAIN}))
    assert "traversal" in refused_files(with_main({"a/../../x.tf": MAIN}))
    assert "absolute" in refused_files(with_main({"/etc/x.tf": MAIN}))
    assert "hidden" in refused_files(with_main({".hidden.tf": MAIN}))
    assert "backslash" in refused_files(with_main({"a\\b.tf": MAIN}))
    assert "state" in refused_files(with_main({"terraform.tfstate.json": "{}"}))
    long = refused_files(with_main({"a" * 5000 + ".tf": MAIN}))
    assert len(long) < 300


def test_safe_name_is_anchored() -> None:
    for name in ("main.tf\n", "main.tf/../x.tf", "x/../main.tf", "main.tf "):
        assert SAFE_NAME.match(name) is None
        assert SAFE_NAME.search(name) is None or SAFE_NAME.search(name).group() != name


def test_check_file_name_refuses_non_strings() -> None:
    with pytest.raises(InvalidRequest):
        check_file_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "names",
    [
        ("main.tf", "Main.tf"),
        ("a.tf", "A.tf"),
        ("x.tf.json", "X.TF.json"),
        ("modules/net/main.tf", "modules/Net/main.tf"),
        ("mod/a.tf", "Mod/b.tf"),
    ],
)
def test_names_colliding_case_insensitively_are_refused(names: tuple[str, str]) -> None:
    files = with_main({name: "{}" if name.endswith(".json") else MAIN for name in names})
    assert "case" in refused_files(files)


@pytest.mark.parametrize(
    "names",
    [("x.tf", "x.tf/main.tf"), ("a/b.json", "a/b.json/c.tf"), ("m/x.tf", "M/x.tf/y.tf")],
)
def test_a_name_cannot_be_both_file_and_directory(names: tuple[str, str]) -> None:
    content = {n: ("{}" if n.endswith(".json") else MAIN) for n in names}
    refused_files(with_main(content))


# ------------------------------------------------------------------------------------------------
# Workspace, variables, secrets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workspace", ["default", "a", "0", "prod-eu_1", "A" * 64, "Z-"])
def test_valid_workspaces(workspace: str) -> None:
    assert parse(workspace=workspace).workspace == workspace


@pytest.mark.parametrize(
    "workspace",
    ["", "-a", "_a", "a b", "a/b", "..", "a.b", "A" * 65, "\u00e4", "a\n", "a\x00", "default "],
)
def test_invalid_workspaces(workspace: str) -> None:
    assert "workspace" in refused(422, workspace=workspace)


@pytest.mark.parametrize("kind", ["variables", "secrets"])
@pytest.mark.parametrize("name", ["a", "_x", "my-var", "a1", "A_B-c", "x" * 128])
def test_valid_variable_and_secret_names(kind: str, name: str) -> None:
    assert getattr(parse(**{kind: {name: "v"}}), kind) == {name: "v"}


@pytest.mark.parametrize("kind", ["variables", "secrets"])
@pytest.mark.parametrize(
    "name", ["", "1a", "-a", "a b", "a=b", "a.b", "a$", "x" * 129, "\u00e4", "a\x00", "a\n"]
)
def test_invalid_variable_and_secret_names(kind: str, name: str) -> None:
    detail = refused(422, **{kind: {name: "v"}})
    assert kind[:-1] in detail


def test_a_name_cannot_be_variable_and_secret() -> None:
    detail = refused(422, variables={"token": "a"}, secrets={"token": "b"})
    assert "token" in detail and "both" in detail
    assert parse(variables={"token": "a"}, secrets={"Token": "b"})


@pytest.mark.parametrize("kind", ["variables", "secrets"])
def test_values_must_not_contain_nul(kind: str) -> None:
    detail = refused(422, **{kind: {"pw": "hunter2\x00"}})
    assert "NUL" in detail and "pw" in detail
    assert "hunter2" not in detail


def test_values_may_hold_anything_else() -> None:
    value = 'multi\nline "quoted" ${not.interpolated} \u00e4\U0001f600'
    assert parse(variables={"a": value}, secrets={"b": value}).secrets == {"b": value}


def test_secret_values_never_appear_in_details() -> None:
    secret = "SUPER-SECRET-VALUE"
    for fields in (
        {"secrets": {"bad name": secret}},
        {"secrets": {"ok": secret + "\x00"}},
        {"secrets": {"ok": secret * 20_000}},
        {"secrets": {"ok": secret}, "variables": {"ok": "x"}},
        {"secrets": {"ok": secret}, "workspace": "-"},
    ):
        with pytest.raises(InvalidRequest) as info:
            parse(**fields)
        assert secret not in info.value.detail


# ------------------------------------------------------------------------------------------------
# HCL
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ('resource "terraform_data" "x" {\n', "unclosed"),
        ("}\n", "unexpected"),
        ("x = [1, 2}\n", "closed by"),
        ('x = "abc\n', "unterminated string"),
        ('x = "abc\ny = "d"\n', "unterminated string"),
        ('x = "a\\qb"\n', "escape"),
        ('x = "\\u12"\n', "escape"),
        ("x = <<EOF\nabc\n", "heredoc"),
        ("x = 1 /* abc\n", "comment"),
        ('x = "${var.a"\n', "unterminated string"),
        ('x = "%%{ if {\n} }"\n', "unterminated string"),  # python-hcl2 alone accepts it
        ('x = f("$${""}")\n', "Unexpected token"),  # "$${" is literal: two strings in a row
        ("x = [" * 1 + "[" * MAX_NESTING + "]" * (MAX_NESTING + 1) + "\n", "nested"),
        ("resource {\n", "unclosed"),
        ("x = = 1\n", ""),
        ('resource "a" "b" {\n  x = \n}\n', ""),
        ("x = 1 +\n", ""),
        ('x = "%{ if true }a"\n', "Unterminated template if"),
        ("terraform { ", "unclosed"),
    ],
)
def test_invalid_hcl_is_422_with_file_and_first_line(content: str, hint: str) -> None:
    detail = refused_files({"main.tf": MAIN, "broken.tf": content})
    assert detail.startswith("invalid HCL in broken.tf: ")
    assert hint in detail
    assert "\n" not in detail


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.tf", "a = 1\n\x00\n"),
        ("comment.tf", "# a NUL in a comment: \x00\n"),  # python-hcl2 would accept it
        ("string.tf", 'a = "\x00"\n'),
        ("terraform.tfvars", 'a = "\x00"\n'),
        ("data.json", '{"a": 1}\x00'),
        ("main.tf.json", '{"\x00": 1}'),
    ],
)
def test_a_nul_character_in_a_file_is_422(name: str, content: str) -> None:
    # PostgreSQL cannot store it (deploy_inputs): refused here, never a 500 at the insert.
    detail = refused_files({"main.tf": MAIN, name: content})
    assert detail == f"file {name!r} contains a NUL character"


def test_invalid_tfvars_is_422() -> None:
    detail = refused_files(with_main({"terraform.tfvars": 'a = "x\n'}))
    assert detail.startswith("invalid HCL in terraform.tfvars")
    refused_files(with_main({"terraform.tfvars": "a = = 1\n"}))


def test_parser_errors_report_lines_and_columns() -> None:
    detail = refused_files({"main.tf": "a = 1\nb = = 2\n"})
    assert "line 2" in detail


@pytest.mark.parametrize(
    "content",
    [
        TYPICAL,
        "",
        "# only a comment\n",
        '\ufeffresource "terraform_data" "x" {}\n',  # BOM, as Windows editors write it
        'resource "terraform_data" "x" {\r\n  input = "a"\r\n}\r\n',
        'locals {\n  a = "$${not.interpolated"\n  b = "}"\n}\n',  # python-hcl2 alone refuses
        'locals {\n  a = "100%"\n  b = "$5"\n  c = "%%{x}"\n  d = "\\"\\\\\\n\\u00e4\\U0001F600"\n}\n',
        "locals {\n  s = <<_EOF\n  text\n_EOF\n}\n",  # python-hcl2 alone refuses "_" markers
        "locals {\n  s = <<EOF\n  text\nEOF  \n}\n",  # ... and blanks after the marker
        "locals {\n  s = <<-EOT\n    a ${var.x} b\n    %{ if true }c%{ endif }\n  EOT\n}\n",
        'locals {\n  s = <<EOF\nterraform {\n  backend "s3" {}\n}\nEOF\n}\n',
        'locals {\n  s = "terraform { backend \\"s3\\" {} }"\n}\n',
        '# terraform {\n#   backend "s3" {}\n# }\n/* terraform { cloud {} } */\n' + MAIN,
        "locals {\n  m = { for k, v in var.m : k => v if v != null }\n"
        '  l = [for s in var.l : upper(s)]\n  t = "${join(",", [for x in var.l : "${x}}"])}"\n}\n',
        'variable "x" {\n  type = object({\n    a = optional(string, "d")\n  })\n'
        '  validation {\n    condition     = var.x.a != ""\n'
        '    error_message = "Must not be empty."\n  }\n}\n',
        "moved {\n  from = terraform_data.a\n  to   = terraform_data.b\n}\n"
        'check "ok" {\n  assert {\n    condition     = true\n    error_message = "no"\n  }\n}\n',
        'resource "terraform_data" "x" {\n  for_each = toset(["a"])\n  input = each.key\n'
        "  lifecycle {\n    create_before_destroy = true\n  }\n}\n",
        'locals {\n  c = var.a ? "x" : (\n    var.b ? "y" : "z"\n  )\n}\n',
        "x = <<EOF\nno trailing newline\nEOF",
    ],
)
def test_valid_hcl_is_accepted(content: str) -> None:
    assert parse(files={"main.tf": content})


def test_deep_hcl_nesting_is_refused_without_recursion_error() -> None:
    content = "x = " + "[" * 50_000 + "]" * 50_000 + "\n"
    detail = refused_files({"main.tf": content})
    assert "nested" in detail
    nested = "x = " + '"${' * 60 + "1" + '}"' * 60 + "\n"  # 120 levels of strings and templates
    assert "nested" in refused_files({"main.tf": nested})


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert parse(files={"main.tf": "x = " + "[" * (MAX_NESTING - 1) + "]" * (MAX_NESTING - 1)})


def test_python_hcl2_recursion_limit_is_not_the_users_fault() -> None:
    # valid HCL that python-hcl2 cannot parse (RecursionError): the scanner's checks stand
    content = "x = " + " + ".join(["1"] * 3000) + "\n"
    with pytest.raises(RecursionError):
        hcl2.loads(content)
    assert parse(files={"main.tf": content})


def test_heredoc_with_many_blank_lines_is_handled() -> None:
    # python-hcl2's heredoc regex alone takes quadratic time here (minutes)
    content = "locals {\n  s = <<EOF\n" + "\n" * 60_000 + "x\nEOF\n}\n"
    assert parse(files={"main.tf": content})
    unclosed = "locals {\n  s = <<EOF\n" + "\n" * 60_000
    assert "heredoc" in refused_files({"main.tf": unclosed})


def test_masked_copy_keeps_lines() -> None:
    text = 'a = "x\\"y"\nb = <<EOF\none\n\ntwo ${1}\nEOF\nc = "$${z}"\n'
    scan = scan_hcl(text)
    assert scan.error is None
    assert scan.masked.count("\n") == text.count("\n")
    assert len(scan.masked.splitlines()[0]) == len(text.splitlines()[0])
    assert hcl2.loads(scan.masked).keys() == {"a", "b", "c"}


# ------------------------------------------------------------------------------------------------
# python-hcl2 as it is (8.x): pinned, so a change of representation shows up here
# ------------------------------------------------------------------------------------------------


def test_python_hcl2_keeps_quotes_and_marks_blocks() -> None:
    doc = hcl2.loads('terraform {\n  backend "s3" {\n    bucket = "b"\n  }\n}\n')
    assert doc == {
        "terraform": [
            {"backend": [{'"s3"': {"bucket": '"b"', "__is_block__": True}}], "__is_block__": True}
        ]
    }
    assert hcl2.loads("terraform {\n  cloud {}\n}\n") == {
        "terraform": [{"cloud": [{"__is_block__": True}], "__is_block__": True}]
    }


def test_python_hcl2_turns_a_line_break_before_the_brace_into_a_label() -> None:
    doc = hcl2.loads('terraform\n{\n  backend "s3" {}\n}\n')
    assert doc == {
        "terraform": [{"\n": {"backend": [{'"s3"': {"__is_block__": True}}], "__is_block__": True}}]
    }
    assert v._backend_in_hcl_doc(doc) == "backend"


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ('terraform {\n  backend "s3" {}\n}\n', "backend"),
        ('terraform {\n  cloud {\n    organization = "o"\n  }\n}\n', "cloud"),
        ('terraform "x" {\n  backend "s3" {}\n}\n', "backend"),
        ('terraform\n{\n  backend "local" {}\n}\n', "backend"),
        ("terraform {\n  backend = {}\n}\n", "backend"),
        ('terraform {}\nterraform {\n  backend "s3" {}\n}\n', "backend"),
        ('terraform {\n  required_providers {\n    cloud = { source = "x/cloud" }\n  }\n}\n', None),
        ('variable "backend" {}\nresource "terraform_data" "cloud" {}\n', None),
        ('data "terraform_remote_state" "x" {\n  backend = "s3"\n}\n', None),
    ],
)
def test_structural_check_on_real_python_hcl2_output(content: str, found: str | None) -> None:
    assert v._backend_in_hcl_doc(hcl2.loads(content)) == found


# ------------------------------------------------------------------------------------------------
# backend and cloud blocks
# ------------------------------------------------------------------------------------------------

BACKENDS = [
    'terraform {\n  backend "s3" {\n    bucket = "b"\n    key    = "k"\n  }\n}\n',
    'terraform {\n  backend "local" {}\n}\n',
    'terraform {\n  cloud {\n    organization = "o"\n    workspaces {\n      name = "w"\n    }\n  }\n}\n',
    "terraform {\n  cloud {}\n}\n",
    'terraform { backend "s3" {} }\n',
    "terraform{cloud{}}",
    'terraform {\n  required_version = ">= 1.5"\n  backend "s3" {}\n}\n',
    '# state\nterraform { # here\n  # the backend:\n  backend "s3" { # s3\n  }\n}\n',
    'terraform /* a */ {\n  /* b */ backend "s3" /* c */ {}\n}\n',
    'terraform {\n\tbackend\t"s3"\t{\n\t}\n}\n',
    'terraform {\r\n  backend "s3" {\r\n  }\r\n}\r\n',
    '\ufeffterraform {\n  backend "s3" {}\n}\n',
    'terraform    {\n\n\n        backend      "s3"      {      }\n\n}\n',
    'terraform\n{\n  backend "s3" {}\n}\n',
    'terraform\n# why not\n\n{\n  backend "s3" {}\n}\n',
    'terraform /* a\n b */ {\n  backend "s3" {}\n}\n',
    'terraform {\n  required_version = ">= 1"\n}\n\nterraform {\n  cloud {}\n}\n',
    "terraform {\n  backend s3 {}\n}\n",
    "terraform {\n  backend = {}\n}\n",
    MAIN + 'terraform {\n  required_providers {\n    null = { source = "hashicorp/null" }\n  }\n'
    '  backend "pg" {\n    conn_str = "postgres://x"\n  }\n}\n',
]


@pytest.mark.parametrize("content", BACKENDS)
def test_backend_and_cloud_blocks_are_refused(content: str) -> None:
    detail = refused_files({"main.tf": content})
    assert "backend" in detail or "cloud" in detail
    assert "manages Terraform state" in detail


@pytest.mark.parametrize("content", BACKENDS)
def test_backend_blocks_are_refused_by_each_check_alone(
    content: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"main.tf": content}
    # the scanner alone: python-hcl2 gets no budget
    with pytest.raises(InvalidRequest, match="manages Terraform state"):
        validate(DeployRequest(files=files), hcl_parse_budget=0)
    # python-hcl2's structure alone: the scanner's finding is ignored
    real_scan = v.scan_hcl

    def blind_scan(text: str, *, check_backend: bool = True) -> ScanResult:
        result = real_scan(text, check_backend=check_backend)
        return ScanResult(result.error, None, result.masked)

    monkeypatch.setattr(v, "scan_hcl", blind_scan)
    with pytest.raises(InvalidRequest, match="manages Terraform state"):
        validate(DeployRequest(files=files), hcl_parse_budget=None)


def test_python_hcl2_lets_a_later_attribute_replace_the_terraform_block() -> None:
    # terraform refuses the attribute, but python-hcl2's dict has lost the block: only the
    # scanner sees the backend
    content = 'terraform {\n  backend "s3" {}\n}\nterraform = 2\n'
    assert hcl2.loads(content) == {"terraform": 2}
    assert "manages Terraform state" in refused_files({"main.tf": content})


def test_backend_in_a_module_file_is_refused() -> None:
    detail = refused_files(
        with_main({"modules/x/versions.tf": 'terraform {\n  backend "s3" {}\n}\n'})
    )
    assert "modules/x/versions.tf" in detail


def test_backend_message_names_file_and_line() -> None:
    detail = refused_files(
        {"main.tf": MAIN, "backend.tf": '\n\nterraform {\n  backend "s3" {}\n}\n'}
    )
    assert detail.startswith("backend.tf line 4: a `backend` block")


@pytest.mark.parametrize(
    "content",
    [
        'variable "backend" {}\n',
        'variable "cloud" {\n  default = "aws"\n}\n',
        'resource "terraform_data" "cloud" {}\n',
        'resource "terraform_data" "backend" {\n  input = "cloud"\n}\n',
        'output "cloud" {\n  value = var.cloud\n}\n',
        'locals {\n  backend = "s3"\n  cloud   = { backend = "x" }\n}\n',
        'module "backend" {\n  source = "./modules/backend"\n  cloud  = true\n}\n',
        'data "terraform_remote_state" "net" {\n  backend = "s3"\n  config = {\n'
        '    bucket = "b"\n  }\n}\n',
        'resource "x_lb" "y" {\n  backend {\n    port = 80\n  }\n  cloud {}\n}\n',
        'terraform {\n  required_providers {\n    cloud = {\n      source = "example/cloud"\n'
        '    }\n    backend = {\n      source = "example/backend"\n    }\n  }\n}\n',
        'terraform {\n  required_version = ">= 1.5"\n}\n',
        'resource "terraform_data" "x" {\n  input = terraform.workspace == "backend" ? 1 : 2\n}\n',
        'resource "terraform_data" "x" {\n  provisioner "local-exec" {\n'
        '    command = "terraform { backend \\"s3\\" {} }"\n  }\n}\n',
        '# terraform { backend "s3" {} }\n' + MAIN,
        "locals {\n  x = <<EOT\nterraform {\n  cloud {}\n}\nEOT\n}\n",
        'backend "x" {}\ncloud {}\n',  # not in a terraform block: terraform's business, not ours
    ],
)
def test_things_merely_named_backend_or_cloud_are_accepted(content: str) -> None:
    assert parse(files={"main.tf": content})


def test_backend_in_tfvars_is_not_a_block() -> None:
    assert parse(files=with_main({"terraform.tfvars": 'backend = "s3"\ncloud = "aws"\n'}))


@pytest.mark.parametrize(
    "content",
    [
        '{"terraform": {"backend": {"s3": {"bucket": "b"}}}}',
        '{"terraform": [{"backend": {"local": {}}}]}',
        '{"terraform": {"cloud": {"organization": "o"}}}',
        '{"terraform": [{"required_version": ">= 1"}, {"cloud": {}}]}',
        '{"terraform": {"backend": {"s3": {}}}, "terraform": {"required_version": ">= 1"}}',
        '{"//": "comment", "terraform": {"required_version": ">= 1", "backend": {"s3": {}}}}',
    ],
)
def test_backend_in_tf_json_is_refused(content: str) -> None:
    for name in ("main.tf.json", "modules/m/main.tf.json"):
        files = {name: content} if "/" not in name else with_main({name: content})
        assert "manages Terraform state" in refused_files(files)


@pytest.mark.parametrize(
    "content",
    [
        '{"variable": {"backend": {}}}',
        '{"resource": {"terraform_data": {"cloud": {"input": "backend"}}}}',
        '{"terraform": {"required_providers": {"cloud": {"source": "x/cloud"}}}}',
        '{"data": {"terraform_remote_state": {"x": {"backend": "s3"}}}}',
    ],
)
def test_tf_json_merely_naming_backend_or_cloud_is_accepted(content: str) -> None:
    assert parse(files={"main.tf.json": content})


def test_backend_in_plain_json_data_is_not_configuration() -> None:
    assert parse(files=with_main({"data.json": '{"terraform": {"backend": {"s3": {}}}}'}))


# ------------------------------------------------------------------------------------------------
# JSON files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["main.tf.json", "x.tfvars.json", "data.json"])
@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        '{"a": }',
        "[1, 2]",
        '"s"',
        "null",
        '{"a": NaN}',
        '{"a": Infinity}',
        "{} x",
        "{'a': 1}",
    ],
)
def test_invalid_json_files_are_422(name: str, content: str) -> None:
    detail = refused_files(with_main({name: content}))
    assert detail.startswith(f"invalid JSON in {name}")


def test_deeply_nested_json_file_does_not_crash() -> None:
    content = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    detail = refused_files(with_main({"data.json": content}))
    assert "invalid JSON in data.json" in detail


def test_valid_json_files_are_accepted() -> None:
    assert parse(
        files=with_main(
            {
                "x.tfvars.json": '{"a": 1, "b": [1, 2], "c": {"d": null}}',
                "main.tf.json": '{"output": {"o": {"value": "${1 + 1}"}}}',
                "data.json": '{"\u00e4": "\U0001f600"}',
            }
        )
    )


# ------------------------------------------------------------------------------------------------
# Bounded parsing, speed
# ------------------------------------------------------------------------------------------------


def typical_files(total: int) -> dict[str, str]:
    files: dict[str, str] = {}
    size = i = 0
    while True:
        text = "".join(
            TYPICAL.replace('terraform {\n  required_version = ">= 1.5"\n}\n', "")
            .replace('"greeting"', f'"greeting{j}"')
            .replace('"hello"', f'"hello{j}"')
            .replace('"message"', f'"message{j}"')
            .replace(".hello.", f".hello{j}.")
            .replace("var.greeting", f"var.greeting{j}")
            for j in range(i * 60, i * 60 + 60)
        )
        if size + len(text) > total:
            return files
        files[f"f{i:03d}.tf"] = text
        size += len(text)
        i += 1


def test_a_1_mib_request_of_typical_files_is_accepted() -> None:
    # How long this takes is measured by bench/validation.py, not here.
    files = typical_files(1024 * 1024 - 1024)
    assert 40 < len(files) <= MAX_FILES
    raw = body(files=files)
    assert len(raw) > 1024 * 1024
    assert parse_deploy_request(raw, 2 * 1024 * 1024)


def test_each_file_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = hcl2.loads

    def counting(text: str, **kw: Any) -> dict[str, Any]:
        calls.append(text)
        return real(text, **kw)

    monkeypatch.setattr(hcl2, "loads", counting)
    parse(files={"a.tf": MAIN, "b.tf": TYPICAL, "c.tfvars": "x = 1\n", "d.tf.json": "{}"})
    assert len(calls) == 3


def test_python_hcl2_parsing_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    real = hcl2.loads

    def counting(text: str, **kw: Any) -> dict[str, Any]:
        parsed.append(v.parse_units(text))
        return real(text, **kw)

    monkeypatch.setattr(hcl2, "loads", counting)
    files = typical_files(300 * 1024)
    parse(files=files)
    assert 0 < sum(parsed) <= HCL_PARSE_BUDGET
    assert len(parsed) < len(files)


def test_smallest_files_are_parsed_first() -> None:
    big = "".join(typical_files(200 * 1024).values())
    # "x = 1 +" passes the scanner; only python-hcl2 finds it
    files = {"main.tf": big, "small.tf": "x = 1 +\n"}
    assert "invalid HCL in small.tf" in refused_files(files)
    assert parse(files=files | {"small.tf": MAIN})


def test_without_budget_everything_is_parsed() -> None:
    files = {"main.tf": "".join(typical_files(60 * 1024).values()) + "x = 1 +\n"}
    assert validate(DeployRequest(files=files))  # past the default budget: the scanner's word
    with pytest.raises(InvalidRequest, match="invalid HCL in main.tf"):
        validate(DeployRequest(files=files), hcl_parse_budget=None)
