"""Validation of ``POST /deploys`` bodies: decode, then check everything before anything is queued.

The HTTP layer calls :func:`parse_deploy_request` with the raw body and turns :class:`InvalidRequest`
into the contract's error JSON (``{"status_code", "detail"}``): ``400`` malformed, ``413`` too
large, ``422`` invalid. Runners reuse :func:`check_file_name` / :data:`SAFE_NAME` before they write a
file anywhere.

HCL files go through two independent checks:

* ``service.hcl_scan.scan_hcl``, a small linear scanner modelled on HashiCorp's own tokenizer
  (``hclsyntax/scan_tokens.rl``): strings, templates, heredocs, comments and brackets. It finds
  unterminated strings/heredocs/comments, unbalanced brackets, invalid escapes, nesting deeper than
  ``MAX_NESTING``, and - textually - any ``backend``/``cloud`` block in a top-level
  ``terraform {}`` block. It runs on every ``.tf``/``.tfvars`` file, whatever the size.
* python-hcl2 (``hcl2.loads``), once per file, on a copy in which the literal text of strings and
  heredocs is masked (same lines): python-hcl2 never parses that text, but some of
  its terminal regexes misread it (``"$${"`` is refused, ``"$${...}"`` runs past the string's end,
  a heredoc body with many blank lines takes quadratic time). The parsed structure is checked for
  ``backend``/``cloud`` again. python-hcl2 is slow - 25 to 60 microseconds a token, about
  100-150 KB of typical HCL a second - so it parses at most :data:`HCL_PARSE_BUDGET`
  :func:`parse_units` of one request, smallest files first. Files past the budget get the
  scanner's checks only; terraform reports any syntax error left when it runs. That keeps a
  1 MiB request well under a second (0.35 s here; about 1.5 s for adversarial token soup).
  Validation is CPU-bound: an async caller should run it in a thread.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgspec

from service.hcl_scan import scan_hcl

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FILE_SUFFIXES",
    "HCL_PARSE_BUDGET",
    "LOCK_FILE_NAME",
    "MAX_LOCK_FILE_BYTES",
    "MAX_FILES",
    "MAX_NAME_LENGTH",
    "MAX_VALUE_BYTES",
    "SAFE_NAME",
    "VARIABLE_NAME",
    "USER_NAME",
    "WORKSPACE_NAME",
    "WORKSPACE_REF",
    "DeployRequest",
    "InvalidRequest",
    "body_limit",
    "check_file_name",
    "check_variable_name",
    "check_workspace",
    "parse_deploy_request",
    "parse_units",
    "validate",
    "warm_up",
]

DEFAULT_MAX_BYTES = 1024 * 1024
MAX_FILES = 200
MAX_NAME_LENGTH = 255
MAX_VARIABLE_NAME_LENGTH = 128
# Variables and secrets reach terraform as TF_VAR_<name>=<value> in its environment. Linux refuses
# (E2BIG) to exec a process with a single environment string longer than 128 KiB
# (MAX_ARG_STRLEN), so a longer value could never reach terraform.
MAX_VALUE_BYTES = 128 * 1024 - 256
# How much HCL of one request python-hcl2 parses, in parse_units() (tokens + line breaks; about
# 37 KB of typical HCL, 0.3-0.5 s). The scanner checks all of it anyway.
HCL_PARSE_BUDGET = 10_000

# One path segment: no leading "." (hidden files, "." and "..") and no leading "-" (never
# mistaken for a command-line option).
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
#: A safe relative file name: segments of [A-Za-z0-9._-] joined by "/". Anchored (\A...\Z), so
#: ``SAFE_NAME.match(name)`` is as strict as ``fullmatch``. Extensions, length and reserved names
#: are checked by :func:`check_file_name`.
SAFE_NAME = re.compile(rf"\A{_SEGMENT}(?:/{_SEGMENT})*\Z")
#: Accepted suffixes (checked case-sensitively, as terraform does). ``.auto.tfvars`` and
#: ``.tfvars.json`` are covered by ``.tfvars`` and ``.json``.
FILE_SUFFIXES = (".tf", ".tf.json", ".tfvars", ".tfvars.json", ".json")
#: The dependency lock file: accepted under exactly this name, at the top level only (where
#: terraform reads it), checked as HCL like the .tf files (docs/providers.md).
LOCK_FILE_NAME = ".terraform.lock.hcl"
#: A lock file holds about a kilobyte per provider; anything much larger is not one.
MAX_LOCK_FILE_BYTES = 128 * 1024
WORKSPACE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
USER_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
#: A workspace as a request names it: ``name`` (the caller's own) or ``owner:name``
#: (docs/workspaces.md). The owner part takes any user name, those made before USER_NAME too.
WORKSPACE_REF = re.compile(r"\A(?:[^:\s\x00-\x1f\x7f]{1,64}:)?[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
VARIABLE_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_-]*\Z")


# --------------------------------------------------------------------------------------------
# The request and the error
# --------------------------------------------------------------------------------------------


class DeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /deploys``."""

    files: dict[str, str]
    workspace: str = "default"
    variables: dict[str, str] = {}
    secrets: dict[str, str] = {}
    action: Literal["apply", "destroy", "plan"] = "apply"
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] | None = None
    # False: every attempt stops after its plan until a person approves it.
    auto_approve: bool = True


class InvalidRequest(Exception):
    """The request is refused. ``status_code`` is 400 (malformed), 413 (too large) or 422
    (invalid); ``detail`` is a message for the user naming the offending file or field. It never
    contains a variable's or secret's value."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        """The contract's error body."""
        return {"status_code": self.status_code, "detail": self.detail}

    def __repr__(self) -> str:
        return f"InvalidRequest({self.status_code}, {self.detail!r})"


def _invalid(detail: str) -> InvalidRequest:
    return InvalidRequest(422, detail)


def _show(value: str, limit: int = 80) -> str:
    """A name as it may appear in a message: quoted, escaped to ASCII (so look-alike letters
    and control characters are visible), shortened."""
    text = ascii(value)
    if len(text) > limit:
        text = text[: limit - 4] + "...'"
    return text


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_decoder = msgspec.json.Decoder(DeployRequest)


def body_limit(max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """The largest raw body :func:`parse_deploy_request` decodes at all. Above ``max_bytes``
    because JSON escaping grows the content (``\\n``, ``\\"``, ``\\u00e9`` for a 2-byte
    character); the content limit itself is checked after decoding. The HTTP layer may use this as
    its own body limit."""
    return 4 * max_bytes + 64 * 1024


def parse_deploy_request(
    body: bytes | bytearray | memoryview | str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    hcl_parse_budget: int | None = HCL_PARSE_BUDGET,
) -> DeployRequest:
    """Decode and validate a ``POST /deploys`` body; raise :class:`InvalidRequest`.

    400: not UTF-8, not JSON. 422: not the request's shape (wrong types, missing ``files``,
    unknown field, ``max_attempts`` out of 1..10), or any check of :func:`validate`. 413: too
    large."""
    if isinstance(body, str):
        try:
            body = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(400, "request body is not valid UTF-8") from exc
    elif not isinstance(body, bytes):
        body = bytes(body)
    if len(body) > body_limit(max_bytes):
        raise InvalidRequest(
            413,
            f"request body too large: {len(body)} bytes (files, variables and secrets "
            f"may hold at most {max_bytes} bytes)",
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(400, f"request body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(400, f"malformed JSON: {exc}") from exc
    except (UnicodeError, RecursionError, ValueError) as exc:  # defensive: never a 500
        raise InvalidRequest(400, f"malformed request body: {exc}") from exc
    return validate(req, max_bytes, hcl_parse_budget=hcl_parse_budget)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def check_file_name(name: str) -> None:
    """Raise :class:`InvalidRequest` (422) unless ``name`` is a safe relative file name that
    terraform reads and that the service may write: segments of ``[A-Za-z0-9._-]`` separated by
    ``/``, no empty/``.``/``..``/hidden/``-``-leading segment, at most 255 characters, ending in
    ``.tf``, ``.tf.json``, ``.tfvars``, ``.tfvars.json`` or ``.json``, and no ``*.tfstate*``.
    The one exception is the lock file, :data:`LOCK_FILE_NAME`, at the top level."""
    if not isinstance(name, str):
        raise _invalid(f"file name must be a string, not {type(name).__name__}")
    if name == LOCK_FILE_NAME:
        return
    if not name:
        raise _invalid("file name must not be empty")
    shown = _show(name)
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(
            f"file name {shown} is too long ({len(name)} characters; at most {MAX_NAME_LENGTH})"
        )
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise _invalid(f"file name {shown} contains a control character ({ch!r})")
    if "\\" in name:
        raise _invalid(f"file name {shown} contains a backslash; separate directories with '/'")
    if name.startswith("/"):
        raise _invalid(f"file name {shown} is an absolute path; only relative names are allowed")
    if name.endswith("/"):
        raise _invalid(f"file name {shown} ends with '/'; it must name a file")
    for segment in name.split("/"):
        if segment == "":
            raise _invalid(f"file name {shown} contains an empty path segment ('//')")
        if segment in (".", ".."):
            raise _invalid(f"file name {shown} contains {segment!r}; path traversal is not allowed")
        if segment.startswith("."):
            raise _invalid(f"file name {shown}: hidden files and directories are not allowed")
        if segment.startswith("-"):
            raise _invalid(f"file name {shown}: a path segment may not start with '-'")
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "._-/")):
            raise _invalid(
                f"file name {shown} contains {ch!r} (U+{ord(ch):04X}); only A-Z, a-z, 0-9, "
                "'.', '_', '-' and '/' are allowed"
            )
    if ".tfstate" in name.lower():
        raise _invalid(
            f"file name {shown}: state files are not accepted; the service manages Terraform state"
        )
    if not name.endswith(FILE_SUFFIXES):
        raise _invalid(
            f"file name {shown}: only .tf, .tf.json, .tfvars, .tfvars.json and .json files "
            "are accepted"
        )
    if SAFE_NAME.match(name) is None:  # belt and braces: the checks above imply it
        raise _invalid(f"file name {shown} is not a safe relative file name")


def check_workspace(workspace: str) -> None:
    if not isinstance(workspace, str) or WORKSPACE_REF.match(workspace) is None:
        raise _invalid(
            f"workspace {_show(str(workspace))} is invalid: 1 to 64 characters of A-Z, a-z, 0-9, "
            "'_' and '-', starting with a letter or digit (another user's: owner:name)"
        )


def check_variable_name(name: str, kind: str = "variable") -> None:
    if not isinstance(name, str) or not name:
        raise _invalid(f"{kind} name must be a non-empty string")
    if len(name) > MAX_VARIABLE_NAME_LENGTH:
        raise _invalid(
            f"{kind} name {_show(name)} is too long ({len(name)} characters; at most "
            f"{MAX_VARIABLE_NAME_LENGTH})"
        )
    if VARIABLE_NAME.match(name) is None:
        raise _invalid(
            f"{kind} name {_show(name)} is not a valid Terraform identifier (a letter or '_', "
            "then letters, digits, '_' or '-')"
        )


def _utf8_len(text: str, what: str) -> int:
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates: only from a Python caller
        raise _invalid(f"{what} is not valid Unicode text") from exc


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def validate(
    req: DeployRequest,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    hcl_parse_budget: int | None = HCL_PARSE_BUDGET,
) -> DeployRequest:
    """Every check of a deploy request; returns ``req`` unchanged or raises
    :class:`InvalidRequest`. ``hcl_parse_budget``: how much HCL python-hcl2 parses, in
    :func:`parse_units` (``None``: all of it; the scanner checks all of it in any case)."""
    files, variables, secrets = req.files, req.variables, req.secrets
    for field, given in (("files", files), ("variables", variables), ("secrets", secrets)):
        if not isinstance(given, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in given.items()
        ):
            raise _invalid(f"{field} must be an object of strings")
    if req.action not in ("apply", "destroy", "plan"):
        raise _invalid(f"action must be 'apply', 'destroy' or 'plan', not {_show(str(req.action))}")
    if req.max_attempts is not None and (
        not isinstance(req.max_attempts, int)
        or isinstance(req.max_attempts, bool)
        or not 1 <= req.max_attempts <= 10
    ):
        raise _invalid("max_attempts must be an integer from 1 to 10")

    # Size first: cheap, and it bounds everything below.
    total = 0
    for name, content in files.items():
        total += _utf8_len(content, f"file {_show(name)}")
        if total > max_bytes:
            break
    else:
        for kind, mapping in (("variable", variables), ("secret", secrets)):
            for name, value in mapping.items():
                size = _utf8_len(value, f"value of {kind} {_show(name)}")
                if size > MAX_VALUE_BYTES:
                    raise InvalidRequest(
                        413,
                        f"value of {kind} {_show(name)} is too large ({size} bytes; at most "
                        f"{MAX_VALUE_BYTES}, the limit of one environment variable)",
                    )
                total += _utf8_len(name, f"{kind} name") + size
    if total > max_bytes:
        raise InvalidRequest(
            413,
            f"request too large: files, variables and secrets hold more than {max_bytes} bytes",
        )
    if len(files) > MAX_FILES:
        raise _invalid(f"too many files: {len(files)} (at most {MAX_FILES})")
    if not files:
        raise _invalid("files must contain at least one file")

    check_workspace(req.workspace)
    _check_names(files)
    _check_variables(variables, secrets)
    _check_contents(files, hcl_parse_budget)
    return req


def _check_names(files: dict[str, str]) -> None:
    for name in sorted(files):
        check_file_name(name)

    seen: dict[str, str] = {}
    directories: dict[str, str] = {}  # lower-cased directory -> its spelling
    for name in sorted(files):
        lowered = name.lower()
        if lowered in seen:
            raise _invalid(
                f"file names {_show(seen[lowered])} and {_show(name)} differ only in case"
            )
        seen[lowered] = name
        parts = name.split("/")
        for i in range(1, len(parts)):
            directory = "/".join(parts[:i])
            other = directories.setdefault(directory.lower(), directory)
            if other != directory:
                raise _invalid(
                    f"directories {_show(other)} and {_show(directory)} differ only in case"
                )
    for lowered, name in seen.items():
        if lowered in directories:
            raise _invalid(
                f"{_show(name)} is a file and also the directory of another file "
                f"({_show(directories[lowered])}/...)"
            )

    if not any("/" not in name and name.endswith((".tf", ".tf.json")) for name in files):
        raise _invalid(
            "no Terraform configuration: at least one .tf or .tf.json file is needed at the top "
            "level (not only in subdirectories)"
        )


def _check_variables(variables: dict[str, str], secrets: dict[str, str]) -> None:
    for kind, mapping in (("variable", variables), ("secret", secrets)):
        for name, value in mapping.items():
            check_variable_name(name, kind)
            if "\x00" in value:
                raise _invalid(f"value of {kind} {_show(name)} contains a NUL character")
    both = sorted(set(variables) & set(secrets))
    if both:
        raise _invalid(f"{_show(both[0])} is both a variable and a secret; give each name once")


# --------------------------------------------------------------------------------------------
# File contents
# --------------------------------------------------------------------------------------------

_STATE_MESSAGE = "the service manages Terraform state, so backend and cloud blocks are not allowed"


def _check_contents(files: dict[str, str], hcl_parse_budget: int | None) -> None:
    to_parse: list[tuple[int, str, str]] = []
    for name in sorted(files):
        content = files[name]
        if "\x00" in content:
            # Not text (terraform refuses it too), and PostgreSQL cannot store it.
            raise _invalid(f"file {_show(name)} contains a NUL character")
        if name == LOCK_FILE_NAME and _utf8_len(content, name) > MAX_LOCK_FILE_BYTES:
            raise InvalidRequest(
                413, f"{name} is too large (at most {MAX_LOCK_FILE_BYTES} bytes)"
            )
        if name.endswith(".json"):
            _check_json(name, content)
            continue
        # .tf or .tfvars
        scan = scan_hcl(content, check_backend=name.endswith(".tf"))
        if scan.error is not None:
            raise _invalid(f"invalid HCL in {name}: {scan.error}")
        if scan.backend is not None:
            block, line = scan.backend
            raise _invalid(
                f"{name} line {line}: a `{block}` block inside `terraform {{}}` is not allowed; "
                f"{_STATE_MESSAGE}"
            )
        to_parse.append((len(scan.masked), name, scan.masked))

    # python-hcl2: each file once, smallest first, as far as the budget goes.
    left = hcl_parse_budget
    for _, name, masked in sorted(to_parse):
        if left is not None:
            if left <= 0:
                break
            units = parse_units(masked)
            if units > left:
                continue
            left -= units
        doc = _parse_hcl(name, masked)
        if doc is not None and name.endswith(".tf"):
            found = _backend_in_hcl_doc(doc)
            if found is not None:
                raise _invalid(
                    f"{name}: a `{found}` block inside `terraform {{}}` is not allowed; "
                    f"{_STATE_MESSAGE}"
                )


def _parse_hcl(name: str, text: str) -> dict[str, Any] | None:
    """hcl2.loads, once; None when python-hcl2 itself cannot cope (recursion), not the file."""
    import hcl2
    from hcl2.utils import SerializationOptions
    from lark.exceptions import VisitError

    try:
        return hcl2.loads(text, serialization_options=SerializationOptions(with_comments=False))
    except RecursionError:
        return None
    except VisitError as exc:
        if isinstance(exc.orig_exc, RecursionError):
            return None
        raise _invalid(f"invalid HCL in {name}: {_first_line(exc.orig_exc)}") from exc
    except Exception as exc:  # lark's UnexpectedInput family, and python-hcl2's own errors
        raise _invalid(f"invalid HCL in {name}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line[:300]


def _unquote(key: Any) -> str:
    return key.strip().strip('"') if isinstance(key, str) else ""


def _backend_in_hcl_doc(doc: dict[str, Any]) -> str | None:
    """A ``backend``/``cloud`` key directly in any top-level ``terraform`` block of a hcl2.loads
    result. python-hcl2 8.x writes blocks as ``{"terraform": [{<body>, "__is_block__": True}]}``,
    labels as nested keys that keep their quotes (``{'"s3"': {...}}``), and even turns a newline
    between a block type and its ``{`` into a label key ``"\\n"``. So label levels are walked
    down to the body, and every key met on the way counts."""
    for key, value in doc.items():
        if _unquote(key) != "terraform":
            continue
        for item in value if isinstance(value, list) else [value]:
            found = _backend_in_block(item, 0)
            if found is not None:
                return found
    return None


def _backend_in_block(node: Any, depth: int) -> str | None:
    if not isinstance(node, dict) or depth > 16:
        return None
    for key in node:
        if _unquote(key) in ("backend", "cloud"):
            return _unquote(key)
    if node.get("__is_block__") is True:
        return None  # the body itself: do not look into nested blocks (required_providers)
    if len(node) == 1:  # a label level: {'"x"': {...}} or {"\n": {...}}
        (value,) = node.values()
        return _backend_in_block(value, depth + 1)
    return None


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its list of (key, value) pairs: duplicate keys are all kept."""


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _check_json(name: str, content: str) -> None:
    try:
        doc = json.loads(content, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise _invalid(f"invalid JSON in {name}: nested too deeply") from exc
    except ValueError as exc:
        raise _invalid(f"invalid JSON in {name}: {_first_line(exc)}") from exc
    if not isinstance(doc, _Pairs):
        raise _invalid(f"invalid JSON in {name}: the top level must be an object")
    if not name.endswith(".tf.json"):
        return
    for key, value in doc:
        if key != "terraform":
            continue
        # one block is an object; several may come as an array of objects
        for block in (
            [value] if isinstance(value, _Pairs) else value if isinstance(value, list) else []
        ):
            if not isinstance(block, _Pairs):
                continue
            for inner, _ in block:
                if inner in ("backend", "cloud"):
                    raise _invalid(
                        f"{name}: a `{inner}` block inside `terraform` is not allowed; "
                        f"{_STATE_MESSAGE}"
                    )


# --------------------------------------------------------------------------------------------
# What python-hcl2's parse time grows with
# --------------------------------------------------------------------------------------------

# python-hcl2's tokens, roughly: a name or number, or any other visible character.
_UNITS = re.compile(r"[\w.-]+|\S")


def parse_units(text: str) -> int:
    """What python-hcl2's parse time grows with: tokens plus line breaks (a long comment or
    string costs little, ``[[],[],...]`` a lot). About 25-60 microseconds each."""
    return _UNITS.subn("", text)[1] + text.count("\n")


def warm_up() -> None:
    """Build python-hcl2's parser now (it takes a moment on first use) rather than during the
    first request."""
    import hcl2

    hcl2.loads("a = 1\n")
