"""A small linear scanner of HCL native syntax, modelled on HashiCorp's own tokenizer
(``hclsyntax/scan_tokens.rl``): strings, templates, heredocs, comments and brackets.

:func:`scan_hcl` finds unterminated strings/heredocs/comments, unbalanced brackets, invalid
escapes, nesting deeper than :data:`MAX_NESTING`, and - textually - any ``backend``/``cloud``
block in a top-level ``terraform {}`` block, in one pass whatever the size. It also gives back a
copy of the text in which the literal text of strings and heredocs is masked (same lines), for
python-hcl2 to parse (``service.validation``: why, and the checks both make).
"""

from __future__ import annotations

import re

import msgspec

# Brackets, strings and template sequences nested deeper than this are refused. Real
# configurations stay far below; python-hcl2 recurses per level and fails at about 150-300.
MAX_NESTING = 100


class ScanResult(msgspec.Struct, frozen=True):
    error: str | None  # the first problem found, for "invalid HCL in <file>: <error>"
    backend: tuple[str, int] | None  # ("backend" | "cloud", line) in a top-level terraform block
    masked: str  # the text for python-hcl2: string and heredoc literals masked, lines unchanged


# Expression-mode tokens; "skip" differs with what matters where. Order matters: comments
# before "/", heredocs before "<". A line break and the identifier after it are one token.
_BODY_SKIP = r"""(?:[^"\#/<{}()\[\]~\n]|"[^"\\$%\n]*"|/(?![/*])|<(?!<)|~(?!\}))"""
_TOKENS = r"""
      (?P<skip>{skip})
    | (?P<nl>\n\s*)(?:(?P<word>[^\W\d][\w-]*)[^\S\n]*)?
    | (?P<comment>\#[^\n]*|//[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<ident>[^\W\d][\w-]*)[^\S\n]*
    | (?P<label>"[^"\\$%\n]*")[^\S\n]*
    | (?P<heredoc><<-?(?P<marker>[^\W\d][\w-]*)\r?\n)
    | (?P<quote>")
    | (?P<open>[{(\[])
    | (?P<close>~?\}|[)\]])
    {extra}
    | (?P<other>.)
"""


def _tokens(skip: str, extra: str = "") -> re.Pattern[str]:
    return re.compile(_TOKENS.replace("{skip}", skip).replace("{extra}", extra), re.VERBOSE)


# At the start of a statement in a body (a block header?): identifiers, labels, "=" and line
# breaks count. "=" and the rest of an attribute's line up to a bracket, string or comment are
# one token.
_HEADER = _tokens(
    r"""[^\S\n]+|[^\s"\#/<{}()\[\]~=A-Za-z_\x80-\U0010FFFF]+""",
    rf"| (?P<assign>=(?![=>]){_BODY_SKIP}*)",
)
# In a body, past a statement's start: only line breaks and what opens or closes something.
# Strings without "\", "$" or "%" are skipped whole: nothing in them needs a look or a mask.
_BODY = _tokens(rf"{_BODY_SKIP}+")
# Inside brackets or a template sequence: line breaks do not count either.
_EXPR = _tokens(r"""(?:[^"\#/<{}()\[\]~]|"[^"\\$%\n]*"|/(?![/*])|<(?!<)|~(?!\}))+""")
# Quoted string literal text: "$${" and "%%{" are escapes, a lone "$" or "%" is literal.
_STRING_TEXT = re.compile(r'(?:\$\$\{|%%\{|[^"\\$%\n]|\\[^\n]|\$(?!\{)|%(?!\{))+')
_ESCAPE = re.compile(r"\\(?:[nrt\"\\]|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8})|\\")
_TEMPLATE_START = re.compile(r"\$\$\{|%%\{|[$%]\{~?")


_CLOSERS = {"{": "}", "(": ")", "[": "]"}
_BODY_KIND, _EXPR_KIND, _INTERP_KIND, _STRING_KIND, _HEREDOC_KIND = (
    "body",
    "expr",
    "interp",
    "string",
    "heredoc",
)


def scan_hcl(text: str, *, check_backend: bool = True) -> ScanResult:
    """Scan HCL native syntax in one linear pass (see the module docstring). ``check_backend``:
    look for ``backend``/``cloud`` in top-level ``terraform`` blocks - textually and
    conservatively: an attribute of that name there counts too, and comments, labels and a line
    break between a block type and its ``{`` are looked through."""
    return _Scanner(text, check_backend).run()


class _Frame:
    """One level of nesting: a body (the file, or a block's), brackets, a template sequence,
    a quoted string or a heredoc."""

    __slots__ = ("kind", "pos", "closer", "terraform", "header", "pending", "marker", "sol")

    def __init__(self, kind: str, pos: int, closer: str = "") -> None:
        self.kind = kind
        self.pos = pos  # where it opened
        self.closer = closer
        self.terraform = False  # body: a top-level terraform block's
        # body: the current statement's words while it may still be a block header (None: it is
        # not one), and a header that a line break ended before its "{"
        self.header: list[str] | None = []
        self.pending: list[str] | None = None
        self.marker = ""  # heredoc
        self.sol = True  # heredoc: at the start of a line


class _ScanError(Exception):
    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


class _Scanner:
    def __init__(self, text: str, check_backend: bool) -> None:
        if text.startswith("\ufeff"):  # terraform skips a UTF-8 byte order mark
            text = " " + text[1:]
        self.text = text
        self.check_backend = check_backend
        self.masked: list[str] = []  # pieces of the masked copy
        self.copied = 0  # text[:copied] is in masked already
        self.backend: tuple[str, int] | None = None

    def line(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def where(self, pos: int) -> str:
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return f"line {self.line(pos)}, column {column}"

    def mask(self, start: int, end: int, replacement: str) -> None:
        self.masked.append(self.text[self.copied : start])
        self.masked.append(replacement)
        self.copied = end

    def run(self) -> ScanResult:
        try:
            self.scan()
        except _ScanError as exc:
            return ScanResult(f"{exc.message} at {self.where(exc.pos)}", None, self.text)
        self.masked.append(self.text[self.copied :])
        return ScanResult(None, self.backend, "".join(self.masked))

    def scan(self) -> None:
        text = self.text
        end = len(text)
        stack = [_Frame(_BODY_KIND, 0)]
        frame = stack[0]
        header_match, body_match, expr_match = _HEADER.match, _BODY.match, _EXPR.match
        pos = 0
        while True:
            kind = frame.kind
            if kind is _STRING_KIND:
                pos = self.string(frame, stack, pos)
                frame = stack[-1]
                continue
            if kind is _HEREDOC_KIND:
                pos = self.heredoc(frame, stack, pos)
                frame = stack[-1]
                continue
            if pos >= end:
                break
            if kind is not _BODY_KIND:
                m = expr_match(text, pos)
            elif frame.header is None:
                m = body_match(text, pos)
            else:
                m = header_match(text, pos)
            assert m is not None  # "other" matches any character but "\n", which "nl" matches
            group = m.lastgroup
            pos = m.end()
            if group == "skip" or group == "comment":
                continue
            if group == "word" or group == "nl":  # a line break (and an identifier after it)
                if kind is not _BODY_KIND:
                    continue
                self.line_break(frame)
                if group == "nl":
                    continue
                group = "ident"
            if group == "assign":  # only in _HEADER: an attribute
                frame.header = frame.pending = None
                continue
            if group == "ident":
                header = frame.header
                if kind is _BODY_KIND and header is not None:
                    word = m.group("ident") or m.group("word")
                    if not header:
                        frame.pending = None
                        if frame.terraform and word in ("backend", "cloud") and not self.backend:
                            self.backend = (word, self.line(m.start(m.lastindex or 0)))
                    header.append(word)
                continue
            if group == "label":  # only in _HEADER: a string with no "\", "$" or "%"
                if frame.header:
                    frame.header.append('"')
                else:
                    frame.header = frame.pending = None
                continue
            if group == "open":
                start = m.start()
                ch = text[start]
                if kind is _BODY_KIND:
                    header = frame.header or frame.pending
                    frame.header = frame.pending = None
                    if ch == "{" and header:  # a block: TYPE LABEL* {
                        frame = self.push(stack, _Frame(_BODY_KIND, start, "}"))
                        frame.terraform = (
                            self.check_backend and len(stack) == 2 and header[0] == "terraform"
                        )
                        continue
                frame = self.push(stack, _Frame(_EXPR_KIND, start, _CLOSERS[ch]))
                continue
            if group == "close":
                ch = text[pos - 1]
                if len(stack) == 1:
                    raise _ScanError(f"unexpected {ch!r}", pos - 1)
                if ch != frame.closer:
                    opened = "${" if kind is _INTERP_KIND else text[frame.pos]
                    raise _ScanError(
                        f"{opened!r} opened at {self.where(frame.pos)} is closed by {ch!r}",
                        pos - 1,
                    )
                stack.pop()
                frame = stack[-1]
                if frame.kind is _BODY_KIND:
                    # whatever follows a block or an object starts afresh (conservative)
                    frame.header, frame.pending = [], None
                continue
            if group == "quote":
                if kind is _BODY_KIND:
                    if frame.header:
                        frame.header.append('"')  # a label
                    else:
                        frame.header = frame.pending = None
                frame = self.push(stack, _Frame(_STRING_KIND, m.start()))
                continue
            if group == "heredoc":
                if kind is _BODY_KIND:
                    frame.header = frame.pending = None
                heredoc = _Frame(_HEREDOC_KIND, m.start())
                heredoc.marker = m.group("marker")
                # python-hcl2 wants markers like [a-zA-Z][a-zA-Z0-9._-]*, terraform identifiers
                self.mask(m.start("marker"), m.end("marker"), "H" * len(heredoc.marker))
                frame = self.push(stack, heredoc)
                continue
            if group == "block_comment":
                start = m.start()
                close = text.find("*/", pos)
                if close < 0:
                    raise _ScanError("unterminated /* comment", start)
                pos = close + 2
                if kind is _BODY_KIND and "\n" in text[start:pos]:
                    self.line_break(frame)
                continue
            # "=", "<", "/", "~" and the like: a statement that is no block header
            if kind is _BODY_KIND:
                frame.header = frame.pending = None
        if len(stack) > 1:
            what = "'${'" if frame.kind is _INTERP_KIND else repr(text[frame.pos])
            raise _ScanError(f"unclosed {what}", frame.pos)

    @staticmethod
    def line_break(frame: _Frame) -> None:
        """A line break (or a comment holding one) in a body ends the statement. A block header
        cut by line breaks and comments may still get its "{": python-hcl2 accepts that."""
        if frame.header:
            frame.pending = frame.header
        frame.header = []

    def push(self, stack: list[_Frame], frame: _Frame) -> _Frame:
        if len(stack) > MAX_NESTING:
            raise _ScanError(f"nested more than {MAX_NESTING} levels deep", frame.pos)
        stack.append(frame)
        return frame

    def string(self, frame: _Frame, stack: list[_Frame], pos: int) -> int:
        """Inside a quoted string (``pos``: after the opening quote or a template sequence)."""
        text = self.text
        m = _STRING_TEXT.match(text, pos)
        if m is not None:
            literal = m.group()
            if "\\" in literal:
                for esc in _ESCAPE.finditer(literal):
                    if len(esc.group()) == 1:
                        raise _ScanError(
                            'invalid escape sequence (valid in a quoted string: \\n \\r \\t \\" '
                            "\\\\ \\uNNNN \\UNNNNNNNN)",
                            pos + esc.start(),
                        )
            # python-hcl2 never parses literal text, but some of its terminals misread it: "$${"
            # with no "}" after it is refused, and "$${...}" runs to the next "}" in the file.
            self.mask(pos, m.end(), "a" * len(literal))
            pos = m.end()
        if pos >= len(text) or text[pos] in "\n\\":
            raise _ScanError(
                "unterminated string (a quoted string cannot span lines; use \\n or a heredoc)",
                frame.pos,
            )
        if text[pos] == '"':
            stack.pop()
            return pos + 1
        # "${" or "%{": a template sequence in expression mode, then back here
        tm = _TEMPLATE_START.match(text, pos)
        assert tm is not None
        self.push(stack, _Frame(_INTERP_KIND, pos, "}"))
        return tm.end()

    def heredoc(self, frame: _Frame, stack: list[_Frame], pos: int) -> int:
        """Inside a heredoc (``pos``: after the ``<<EOF`` line or a template sequence), line by
        line until a line holding only the marker, as terraform reads it."""
        text = self.text
        body_start = pos
        while True:
            if pos >= len(text):
                raise _ScanError(f"unclosed heredoc <<{frame.marker}", frame.pos)
            eol = text.find("\n", pos)
            line_end = len(text) if eol < 0 else eol
            if frame.sol:
                line = text[pos:line_end]
                if line.strip() == frame.marker:
                    self.mask_heredoc(body_start, pos)
                    # python-hcl2 wants the marker alone on its line, no blanks after it
                    at = pos + len(line) - len(line.lstrip())
                    self.mask(at, line_end, "H" * len(frame.marker))
                    stack.pop()
                    return line_end  # the line break after the marker ends the expression
            scan_from = pos
            while True:  # a template sequence on this line? ("$${" and "%%{" are escapes)
                tm = _TEMPLATE_START.search(text, scan_from, line_end)
                if tm is None or tm.group() not in ("$${", "%%{"):
                    break
                scan_from = tm.end()
            if tm is not None:
                self.mask_heredoc(body_start, tm.start())
                frame.sol = False
                self.push(stack, _Frame(_INTERP_KIND, tm.start(), "}"))
                return tm.end()
            if eol < 0:
                raise _ScanError(f"unclosed heredoc <<{frame.marker}", frame.pos)
            pos = eol + 1
            frame.sol = True

    def mask_heredoc(self, start: int, end: int) -> None:
        """Replace literal heredoc text by "0" per line, keeping the line count: python-hcl2
        never parses it, and its heredoc regex takes quadratic time on runs of blank lines."""
        if end <= start:
            return
        chunk = self.text[start:end]
        tail = chunk.rsplit("\n", 1)[-1]
        self.mask(start, end, "0\n" * chunk.count("\n") + ("0" if tail else ""))
