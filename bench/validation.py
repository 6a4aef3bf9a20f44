"""How long POST /deploys input checks take, for typical and hostile bodies.

    .venv/bin/python bench/validation.py [--quick]

Prints the median of several runs per case. Target: a 1 MiB typical request well under 1 s.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

from service.validation import InvalidRequest, parse_deploy_request

BLOCK = """\
variable "greeting{j}" {{
  type        = string
  default     = "hello"
}}

resource "terraform_data" "hello{j}" {{
  input = var.greeting{j}
  provisioner "local-exec" {{
    command = "echo ${{self.input}} > /tmp/out.txt"
  }}
}}
"""


def typical(total: int, per_file: int = 60) -> dict[str, str]:
    files: dict[str, str] = {}
    size = i = 0
    while True:
        text = "".join(BLOCK.format(j=j) for j in range(i * per_file, (i + 1) * per_file))
        if size + len(text) > total:
            return files
        files[f"f{i:03d}.tf"] = text
        size += len(text)
        i += 1


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def run(raw: bytes, limit: int) -> None:
    with contextlib.suppress(InvalidRequest):
        parse_deploy_request(raw, limit)


def main() -> None:
    quick = "--quick" in sys.argv
    repeats = 1 if quick else 5
    mib = 1024 * 1024
    files = typical(mib - 1024)
    cases = {
        "1 MiB, ~60 files of typical HCL": body(files=files),
        "1 MiB, one file": body(files={"main.tf": "".join(files.values())}),
        "2 MiB content (413)": body(files={"main.tf": "#" * (2 * mib)}),
        "10,000 files (422)": body(files={f"f{i}.tf": "x = 1\n" for i in range(10_000)}),
        "JSON nested 100,000 deep (400)": b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "HCL nested 50,000 deep (422)": body(files={"main.tf": "x = " + "[" * 50_000 + "]" * 50_000}),
        "256 KiB of [[],[],...] (token-dense)": body(files={"main.tf": "x = [" + "[]," * (87_000) + "]\n"}),
        "256 KiB of a{} blocks": body(files={"main.tf": "a{}\n" * 65_000}),
        "heredoc with 60,000 blank lines": body(files={"main.tf": "locals {\n  s = <<EOF\n" + "\n" * 60_000 + "x\nEOF\n}\n"}),
    }
    print(f"{'case':<36} {'body':>9} {'median':>9}")
    for name, raw in cases.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(raw, mib)
            times.append(time.perf_counter() - start)
        print(f"{name:<36} {len(raw) / 1024:>7.0f}KiB {statistics.median(times) * 1000:>7.0f}ms")


if __name__ == "__main__":
    main()
