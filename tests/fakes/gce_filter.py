"""How Compute list calls select and page: the `filter` (`labels.k = "v"`, ...) and
`maxResults` / `pageToken`.

The filter: `labels.k = "v"`, `status != RUNNING`, `name eq inst-.*`,
`labels.k:*`, joined by AND / OR / juxtaposition, parenthesized, NOT. A syntax error is the
API's 400, so a provider sending a malformed filter finds out here, not in production."""

from __future__ import annotations

import base64
import fnmatch
import re

from .gce_model import fingerprint, invalid

_TOKEN = re.compile(
    r'\s*(?:(?P<paren>[()])|(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>!=|>=|<=|=|:|>|<)'
    r'|(?P<word>[^\s()=!:<>"]+))'
)


class FilterError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"cannot read the filter at {text[pos:]!r}")
        pos = m.end()
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out.append((kind, value))
    return out


def _values(resource, path: list[str]) -> list:
    """Every value at a dotted path; lists fan out (networkInterfaces.networkIP)."""
    found = [resource]
    for part in path:
        nxt = []
        for v in found:
            if isinstance(v, list):
                v = [x.get(part) for x in v if isinstance(x, dict)]
                nxt.extend(x for x in v if x is not None)
            elif isinstance(v, dict) and part in v:
                nxt.append(v[part])
        found = nxt
    flat = []
    for v in found:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _eq(actual, want: str) -> bool:
    a = _text(actual)
    if "*" in want:
        return fnmatch.fnmatchcase(a, want) or fnmatch.fnmatchcase(a.rsplit("/", 1)[-1], want)
    # URL fields (zone, machineType) also match by their last segment, as the API allows
    return a == want or (a.startswith("http") and a.rsplit("/", 1)[-1] == want)


def _compare(field: str, op: str, want: str, resource: dict) -> bool:
    values = _values(resource, field.split("."))
    if op == ":":
        return bool(values) if want == "*" else any(_eq(v, want) for v in values)
    if op in ("eq", "ne"):
        try:
            rx = re.compile(want)
        except re.error as e:
            raise FilterError(f"bad regular expression {want!r}: {e}") from None
        hit = any(rx.fullmatch(_text(v)) for v in values)
        return hit if op == "eq" else not hit
    if op == "=":
        return any(_eq(v, want) for v in values)
    if op == "!=":
        return not any(_eq(v, want) for v in values)

    def num(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return _text(x)

    order = {
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
    }[op]
    try:
        return any(order(num(v), num(want)) for v in values)
    except TypeError:
        return False


class _Parser:
    def __init__(self, tokens):
        self.t, self.i = tokens, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self):
        tok = self.peek()
        if tok[0] is None:
            raise FilterError("the filter ends too early")
        self.i += 1
        return tok

    def expr(self):
        """or-expression of and-expressions; juxtaposition is AND."""
        terms = [self.conj()]
        while self.peek() == ("word", "OR"):
            self.take()
            terms.append(self.conj())
        return lambda r: any(t(r) for t in terms)

    def conj(self):
        terms = [self.term()]
        while True:
            kind, value = self.peek()
            if kind is None or (kind, value) in (("paren", ")"), ("word", "OR")):
                break
            if (kind, value) == ("word", "AND"):
                self.take()
            terms.append(self.term())
        return lambda r: all(t(r) for t in terms)

    def term(self):
        kind, value = self.take()
        if (kind, value) == ("word", "NOT"):
            inner = self.term()
            return lambda r: not inner(r)
        if (kind, value) == ("paren", "("):
            inner = self.expr()
            if self.take() != ("paren", ")"):
                raise FilterError("unbalanced parentheses")
            return inner
        if kind != "word":
            raise FilterError(f"expected a field name, found {value!r}")
        field = value
        op_kind, op = self.take()
        if not (op_kind == "op" or (op_kind == "word" and op in ("eq", "ne"))):
            raise FilterError(f"expected an operator after {field!r}, found {op!r}")
        v_kind, want = self.take()
        if v_kind not in ("word", "str"):
            raise FilterError(f"expected a value after {field} {op}")
        return lambda r: _compare(field, op, want, r)


def compile_filter(text: str | None):
    """A predicate over resources (dicts in the API's JSON form); raises FilterError."""
    if not text or not text.strip():
        return lambda r: True
    parser = _Parser(_tokens(text))
    pred = parser.expr()
    if parser.i != len(parser.t):
        raise FilterError(f"unexpected {parser.t[parser.i][1]!r} in the filter")
    return pred


def select(items: list[dict], query: dict) -> list[dict]:
    try:
        pred = compile_filter(query.get("filter"))
    except FilterError as e:
        raise invalid(
            "filter", query.get("filter"), f"Invalid list filter expression: {e}"
        ) from None
    return [i for i in items if pred(i)]


def paginate(items: list[dict], query: dict) -> tuple[list[dict], str | None]:
    """maxResults (0..500, default 500) and an opaque pageToken, as the API pages."""
    try:
        size = int(query.get("maxResults") or 500)
    except ValueError:
        raise invalid("maxResults", query.get("maxResults"), "Must be an integer.") from None
    if not 0 <= size <= 500:
        raise invalid("maxResults", size, "Must be between 0 and 500.")
    size = size or 500
    start = 0
    if query.get("pageToken"):
        try:
            start = int(base64.urlsafe_b64decode(query["pageToken"]).decode().split(":")[1])
        except (ValueError, IndexError):
            raise invalid("pageToken", query["pageToken"], "Invalid page token.") from None
    page = items[start : start + size]
    more = start + size < len(items)
    token = (
        base64.urlsafe_b64encode(f"offset:{start + size}:{fingerprint()}".encode()).decode()
        if more
        else None
    )
    return page, token
