"""The tools MOSS calls by command, as plugins: calculator, equation solver, web search, text-to-image.

Commands look like ``Calculate("24*15")``, ``Solve("3x+5=20;x-y=1")``, ``Search("...")`` and
``Text2Image("...")`` (moss-003's APIs), several per turn; each plugin returns the result
line(s) that go into the ``<|Results|>`` field, in moss-003's layout::

    Calculate("24*15") => '360'
    Solve("3x+5=20") =>
    x = 5
    Search("MOSS Fudan") =>
    <|1|>: "first snippet"
    <|2|>: "second snippet"

Calculator and solver are real (sympy). Expressions are parsed by a small whitelisting parser
into sympy objects — never ``eval`` and never sympy's string parser (which evaluates Python) —
so a hostile command cannot run code; sizes, nesting and exponents are bounded. sympy's
``solve`` can still run for ever on inputs that parse (high-degree polynomials, fractional
powers), so as plugins both run in a worker process with a time and memory limit
(:mod:`moss_train.chat.sandbox`). Any failure reads ``No result.`` to the model, as in
moss-003; the reason is kept for the user (:class:`ToolCall.error`).

Web search and text-to-image have no built-in service: a user configures a backend — a Python
callable (``"module:function"``) or an HTTP endpoint — and they are off until then. A new
plugin is one small class: subclass :class:`Plugin`, set ``name`` (its capability line in the
meta instruction, see ``format.PLUGIN_CAPABILITIES``) and ``api``, write ``answer``, and
decorate it with :func:`register`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import sympy

from moss_train import format as fmt
from moss_train.chat.sandbox import ToolError, default_sandbox

NO_RESULT = "No result."
MAX_CHARS = 256
MAX_DEPTH = 24
MAX_EXPONENT = 512
MAX_RESULT_BITS = 1 << 16  # bounds a power's size before sympy computes it
_FUNCTIONS = {
    "sqrt": sympy.sqrt,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "log": sympy.log,
    "ln": sympy.log,
    "exp": sympy.exp,
    "abs": sympy.Abs,
}
_CONSTANTS = {"pi": sympy.pi, "e": sympy.E}
# ASCII digits only: \d would also take "1٠0" (an Arabic-Indic zero) as the number 100.
_TOKEN = re.compile(r"([ \t]*)(?:([0-9]+(?:\.[0-9]+)?|\.[0-9]+)|([A-Za-z]+)|(\*\*|[-+*/^(),=×÷]))")


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str, bool]]:
    """(kind, text, touching) per token; `touching`: no space before it. Only touching factors
    multiply implicitly ("2x", "3(x+1)"), so "12 34" is an error, not 408."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    if "\n" in text.strip() or "\r" in text.strip():
        raise ExpressionError("one expression per command (the text has several lines)")
    out, at = [], 0
    text = text.strip()
    while at < len(text):
        match = _TOKEN.match(text, at)
        if not match:
            raise ExpressionError(f"unexpected {text[at : at + 10]!r}")
        space, number, name, op = match.groups()
        kind, value = (
            ("num", number)
            if number
            else ("name", name)
            if name
            else ("op", {"×": "*", "÷": "/", "**": "^"}.get(op, op))
        )
        out.append((kind, value, not space))
        at = match.end()
    return out


class _Parser:
    """expr := term (+|- term)*; term := unary ((*|/|implicit) unary)*; unary := (+|-) unary | power;
    power := atom (^ unary)?; atom := number | constant | variable | function(expr) | (expr)."""

    def __init__(self, tokens: list[tuple[str, str, bool]], variables: bool):
        self.tokens, self.at, self.depth, self.variables = tokens, 0, 0, variables

    def parse(self):
        value = self.expr()
        if self.at != len(self.tokens):
            raise ExpressionError(f"unexpected {self.tokens[self.at][1]!r}")
        return value

    def peek(self, *ops: str) -> bool:
        return self.at < len(self.tokens) and self.tokens[self.at][0] == "op" and self.tokens[self.at][1] in ops

    def take(self) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            raise ExpressionError("unexpected end")
        self.at += 1
        return self.tokens[self.at - 1][:2]

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError("nested too deeply")
        value = self.term()
        while self.peek("+", "-"):
            value = value + self.term() if self.take()[1] == "+" else value - self.term()
        self.depth -= 1
        return value

    def term(self):
        value = self.unary()
        while True:
            if self.peek("*", "/"):
                op = self.take()[1]
                right = self.unary()
                value = value * right if op == "*" else value / right
            elif self._implicit_factor_follows():
                value = value * self.unary()  # implicit: 2x, 3(x+1), x(y+1)
            else:
                return value

    def _implicit_factor_follows(self) -> bool:
        """A factor that multiplies the previous one without an operator: it must touch it,
        and a number never follows another factor implicitly ("2 3", "x2", "1.5.5")."""
        if self.at >= len(self.tokens):
            return False
        kind, _, touching = self.tokens[self.at]
        return touching and (kind == "name" or self.peek("("))

    def unary(self):
        if self.peek("+", "-"):
            sign = self.take()[1]
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError("nested too deeply")
            value = self.unary()
            self.depth -= 1
            return -value if sign == "-" else value
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek("^"):
            self.take()
            exponent = self.unary()
            if exponent.is_number and (abs(exponent) > MAX_EXPONENT or _result_bits(base, exponent) > MAX_RESULT_BITS):
                raise ExpressionError("power too large")
            return base**exponent
        return base

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            return sympy.Rational(text) if "." in text else sympy.Integer(text)
        if kind == "name":
            if text in _FUNCTIONS and self.peek("("):
                self.take()
                argument = self.expr()
                if not self.peek(")"):
                    raise ExpressionError(f"{text}( is not closed")
                self.take()
                return _FUNCTIONS[text](argument)
            if text in _CONSTANTS:
                return _CONSTANTS[text]
            if self.variables and len(text) <= 2:
                return sympy.Symbol(text)
            raise ExpressionError(f"unknown name {text!r}")
        if text == "(":
            value = self.expr()
            if not self.peek(")"):
                raise ExpressionError("( is not closed")
            self.take()
            return value
        raise ExpressionError(f"unexpected {text!r}")


def _result_bits(base, exponent) -> float:
    """About how many bits base**exponent has (0 when the base is not a plain number)."""
    if not base.is_number or base == 0:
        return 0.0
    return float(abs(sympy.N(sympy.log(abs(base), 2)))) * float(abs(exponent))


def parse_expression(text: str, variables: bool = False):
    """A sympy expression from calculator / equation syntax (whitelisted grammar only)."""
    return _Parser(_tokens(text), variables).parse()


MAX_INTEGER_DIGITS = 15


def format_number(value) -> str:
    """An exact integer as digits (up to 15; a longer one, e.g. 2444^294, as a calculator shows
    it: 10 significant digits and an exponent, not a thousand digits in the model's context),
    anything else as a decimal with up to 10 significant digits."""
    value = sympy.nsimplify(value) if isinstance(value, sympy.Float) and value == int(value) else value
    if value.is_Integer:
        digits = str(abs(int(value)))
        if len(digits) <= MAX_INTEGER_DIGITS:
            return str(int(value))
        mantissa = f"{int(digits[:11]) / 10**10:.10g}"  # 10 significant digits, rounded
        exponent = len(digits) - 1 + (mantissa == "10")
        return f"{'-' if value < 0 else ''}{'1' if mantissa == '10' else mantissa}e+{exponent}"
    if not value.is_finite:
        raise ExpressionError("not a finite number")
    number = complex(sympy.N(value, 15))
    if abs(number.imag) > 1e-12:
        raise ExpressionError("complex result")
    if not math.isfinite(number.real):  # e.g. exp(exp(exp(9))) overflows a float
        raise ExpressionError("not a finite number")
    return f"{number.real:.10g}"


# Everything sympy may raise on a bad expression; these become the reason of a "No result.".
_MATH_ERRORS = (
    ExpressionError,
    ZeroDivisionError,
    TypeError,
    ValueError,
    OverflowError,
    ArithmeticError,
    NotImplementedError,
)


def calculate_or_raise(expression: str) -> str:
    """The calculator's answer to `expression`; ExpressionError says why there is none."""
    try:
        return format_number(parse_expression(expression))
    except ExpressionError:
        raise
    except _MATH_ERRORS as error:
        raise ExpressionError(f"{type(error).__name__}: {error}") from None


def calculate(expression: str) -> str:
    """The calculator's answer to `expression`, or NO_RESULT (in-process: trusted input)."""
    try:
        return calculate_or_raise(expression)
    except ExpressionError:
        return NO_RESULT


def solve_or_raise(equations: str) -> str:
    """Solutions of ';'-separated equations as "x = 5" lines (one solution); else ExpressionError."""
    try:
        differences = []  # each equation as lhs - rhs = 0
        for part in [p for p in equations.split(";") if p.strip()]:
            sides = part.split("=")
            if len(sides) != 2:
                raise ExpressionError("each equation needs exactly one '='")
            differences.append(parse_expression(sides[0], True) - parse_expression(sides[1], True))
        symbols = sorted(set().union(*(d.free_symbols for d in differences)), key=str) if differences else []
        if not symbols:
            raise ExpressionError("nothing to solve for")
        solution = _unique_solution(differences, symbols)
        return "\n".join(f"{s} = {_solution_text(solution[s])}" for s in symbols)
    except ExpressionError:
        raise
    except _MATH_ERRORS as error:
        raise ExpressionError(f"{type(error).__name__}: {error}") from None


def solve(equations: str) -> str:
    """solve_or_raise's lines, or NO_RESULT (in-process: trusted input; sympy's solve can run
    for ever on some systems, so hostile input goes through the plugin's sandbox)."""
    try:
        return solve_or_raise(equations)
    except ExpressionError:
        return NO_RESULT


def _unique_solution(differences: list, symbols: list) -> dict:
    """The one solution of the system (linear systems by linsolve, ten times faster), else raise."""
    try:
        solutions = [dict(zip(symbols, values)) for values in sympy.linsolve(differences, symbols)]
    except ValueError:  # nonlinear (sympy's NonlinearError is a ValueError)
        solutions = sympy.solve(differences, symbols, dict=True)
    if len(solutions) != 1 or set(solutions[0]) != set(symbols) or any(v.free_symbols for v in solutions[0].values()):
        raise ExpressionError("no unique solution")
    return solutions[0]


def _solution_text(value) -> str:
    return str(value) if value.is_Rational else format_number(value)


# ----------------------------------------------------------------------------- plugins
MAX_COMMANDS = 8  # commands run per turn; more are answered with an error
MAX_COMMANDS_CHARS = 8192  # of a commands field parsed at all
# Seconds all the commands of one turn may take together (each also has its own limit, e.g. the
# sandbox's 5 s): eight slow commands would otherwise hold a turn for 40 s.
TURN_BUDGET_S = 10.0
MAX_RESULT_LINE_CHARS = 1024  # each line of an answer in the results field; longer ones are cut
MAX_SHOWN_ARGUMENT_CHARS = 256  # of a command's argument, repeated in its results line


def result_line(api: str, argument: str, answer: str, multiline: bool = False) -> str:
    """One command's results line(s) in moss-003's layout, as the model will read them: no
    special token spelled out by the argument or the answer, the argument shown up to
    MAX_SHOWN_ARGUMENT_CHARS and each answer line up to MAX_RESULT_LINE_CHARS characters."""
    shown = _cut(fmt.without_special_tokens(argument), MAX_SHOWN_ARGUMENT_CHARS)
    answer = "\n".join(_cut(line, MAX_RESULT_LINE_CHARS) for line in fmt.without_special_tokens(answer).split("\n"))
    return fmt.result_line(api, shown, answer, multiline)  # the layout lives in format.py


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 6] + " [...]"


@dataclass
class ToolCall:
    """One command of a turn and what came of it."""

    api: str
    argument: str
    answer: str  # what the model sees (NO_RESULT on any failure)
    line: str  # the results line(s), moss-003 layout
    error: Optional[str] = None  # why there is no result (for the user and logs)


class Plugin:
    """A tool MOSS calls by command. Subclasses set the class attributes and write `answer`."""

    name = ""  # the capability in the meta instruction (format.PLUGIN_CAPABILITIES)
    api = ""  # the command: Calculate("...")
    max_argument_chars = 1024
    max_answer_chars = 4096

    def answer(self, argument: str) -> str:
        """The answer text; raise (anything) when there is none — the model sees NO_RESULT."""
        raise NotImplementedError

    def answer_within(self, argument: str, timeout_s: Optional[float]) -> str:
        """`answer`, given at most `timeout_s` seconds (None: the plugin's own limit). Plugins
        that can stop their work early override this; the default runs `answer`."""
        return self.answer(argument)

    @property
    def plugin(self) -> str:  # the name under which demo_dialogues and older callers know it
        return self.name

    def call(self, argument: str, timeout_s: Optional[float] = None) -> ToolCall:
        """Run the command (within `timeout_s` where the plugin can stop early); never raises
        (a plugin's failure is an answer the model sees)."""
        try:
            if len(argument) > self.max_argument_chars:
                raise ToolError(f"argument longer than {self.max_argument_chars} characters")
            answer = self.answer_within(argument, timeout_s)
            if not isinstance(answer, str) or not answer.strip():
                raise ToolError(f"no answer ({type(answer).__name__})")
            answer, error = fmt.without_special_tokens(answer[: self.max_answer_chars]), None
        except Exception as exc:  # a user's backend may raise anything; the chat goes on
            answer, error = NO_RESULT, str(exc) or type(exc).__name__
        return ToolCall(self.api, argument, answer, self.result_line(argument, answer), error)

    @property
    def multiline(self) -> bool:
        """The answer on the lines after "=>" (moss-003's solver and search; format.py says which)."""
        return self.api in fmt.MULTILINE_RESULT_APIS

    def run(self, argument: str) -> str:
        return self.call(argument).answer

    def result_line(self, argument: str, answer: Optional[str] = None) -> str:
        """The results line(s) for one command (`answer`: already run)."""
        answer = self.run(argument) if answer is None else answer
        return result_line(self.api, argument, answer, self.multiline)


PLUGINS: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Make a plugin class available by its name (``--plugins NAME``)."""
    PLUGINS[cls.name] = cls
    return cls


class SandboxedPlugin(Plugin):
    """A plugin whose work (`target`, "module:function") runs in the sandbox worker."""

    target = ""

    def answer(self, argument: str) -> str:
        return self.answer_within(argument, None)

    def answer_within(self, argument: str, timeout_s: Optional[float]) -> str:
        sandbox = default_sandbox()
        limit = sandbox.timeout_s if timeout_s is None else min(sandbox.timeout_s, timeout_s)
        return sandbox.call(self.target, argument, timeout_s=limit)


@register
class Calculator(SandboxedPlugin):
    name, api, target = "calculator", "Calculate", "moss_train.chat.plugins:calculate_or_raise"
    max_argument_chars = MAX_CHARS


@register
class EquationSolver(SandboxedPlugin):
    name, api, target = "equation_solver", "Solve", "moss_train.chat.plugins:solve_or_raise"
    max_argument_chars = MAX_CHARS


# ----------------------------------------------------------------------------- configured backends
Backend = Callable[..., Union[str, list]]  # (api, argument[, limit_s]) -> text or a list of items
HTTP_TIMEOUT_S = 20.0
MAX_RESPONSE_BYTES = 1 << 16


def callable_backend(target: str, timeout_s: float = HTTP_TIMEOUT_S) -> Backend:
    """A Python function ``"module:function"`` called with the argument, given `timeout_s`.

    It runs in a thread of this process (it is the user's own code, not the model's): a call
    that overruns is abandoned and answered with an error, the thread finishes on its own.
    """
    from moss_train.chat.sandbox import resolve

    function = resolve(target)

    def call(api: str, argument: str, limit_s: Optional[float] = None):
        limit = timeout_s if limit_s is None else min(timeout_s, limit_s)
        box: dict = {}

        def work():
            try:
                box["value"] = function(argument)
            except Exception as error:
                box["error"] = error

        thread = threading.Thread(target=work, daemon=True, name=f"moss-{api}")
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            raise ToolError(f"{target} took longer than {limit:.3g} s")
        if "error" in box:
            raise ToolError(f"{target} failed: {box['error']}")
        return box["value"]

    return call


def http_backend(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Backend:
    """An HTTP endpoint: POST ``{"api": API, "input": argument}`` as JSON; the answer is the
    response's JSON ``{"result": text or [items]}`` (or a JSON string / list), else its text.
    At most MAX_RESPONSE_BYTES are read; the time limit covers connecting and each read."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url!r}: an HTTP backend needs an http:// or https:// URL")

    def call(api: str, argument: str, limit_s: Optional[float] = None):
        body = json.dumps({"api": api, "input": argument}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(
                request, timeout=timeout_s if limit_s is None else min(timeout_s, limit_s)
            ) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except OSError as error:  # URLError, HTTPError, timeouts
            raise ToolError(f"{url}: {error}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ToolError(f"{url}: response larger than {MAX_RESPONSE_BYTES} bytes")
        text = raw.decode("utf-8", errors="replace")
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value.get("result", text) if isinstance(value, dict) else value

    return call


def make_backend(spec: Union[str, Backend], timeout_s: float = HTTP_TIMEOUT_S) -> Backend:
    """A backend called as ``(api, argument, limit_s)``; a function given directly (code the
    user wrote, not the model) is called as it is, with no time limit of ours."""
    if callable(spec):
        return lambda api, argument, limit_s=None: spec(api, argument)
    return http_backend(spec, timeout_s) if "://" in spec else callable_backend(spec, timeout_s)


class ExternalPlugin(Plugin):
    """A plugin answered by a backend the user configures (see make_backend)."""

    def __init__(self, backend: Union[str, Backend], timeout_s: float = HTTP_TIMEOUT_S):
        self.backend = backend
        self._call = make_backend(backend, timeout_s)

    def answer(self, argument: str) -> str:
        return self.answer_within(argument, None)

    def answer_within(self, argument: str, timeout_s: Optional[float]) -> str:
        return self.render(self._call(self.api, argument, timeout_s))

    def render(self, value) -> str:
        if isinstance(value, (list, tuple)):
            return "\n".join(str(item) for item in value)
        return str(value)


@register
class WebSearch(ExternalPlugin):
    """``Search("query")``: the backend returns snippets, shown numbered as moss-003 did."""

    name, api = "web_search", "Search"

    def render(self, value) -> str:
        items = value if isinstance(value, (list, tuple)) else [value]
        return "\n".join(f"<|{i}|>: {json.dumps(str(item), ensure_ascii=False)}" for i, item in enumerate(items, 1))


@register
class Text2Image(ExternalPlugin):
    """``Text2Image("description")``: the backend returns where the image is (a path or URL)."""

    name, api = "text2img", "Text2Image"


BUILTIN = ("calculator", "equation_solver")  # need no configuration


def build_plugins(spec: Union[str, Iterable[str]], timeout_s: float = HTTP_TIMEOUT_S) -> dict[str, Plugin]:
    """Plugins by name from ``"calculator,equation_solver,web_search=module:function,
    text2img=http://host/path"`` (or the same items as a list); a name without ``=BACKEND``
    works only for the built-in ones."""
    items = [item.strip() for item in (spec.split(",") if isinstance(spec, str) else spec) if item.strip()]
    plugins: dict[str, Plugin] = {}
    for item in items:
        name, _, backend = item.partition("=")
        cls = PLUGINS.get(name)
        if cls is None:
            raise ValueError(f"unknown plugin {name!r}; known: {', '.join(PLUGINS)}")
        if issubclass(cls, ExternalPlugin):
            if not backend:
                raise ValueError(f"plugin {name} needs a backend: {name}=module:function or {name}=http://host/path")
            plugins[name] = cls(backend, timeout_s)
        else:
            if backend:
                raise ValueError(f"plugin {name} is built in and takes no backend")
            plugins[name] = cls()
    return plugins


# ----------------------------------------------------------------------------- commands
TOOLS: dict[str, Plugin] = {cls.api: cls() for cls in (Calculator, EquationSolver)}  # the built-ins by API


def parse_commands(commands_text: str) -> list[tuple[str, str]]:
    """(api, argument) pairs of a commands field body, e.g. ``Calculate("1+1")`` (its first
    MAX_COMMANDS_CHARS characters)."""
    return fmt.parse_commands((commands_text or "")[:MAX_COMMANDS_CHARS])


def call_tools(commands_text: str, plugins: Mapping[str, Plugin], budget_s: float = TURN_BUDGET_S) -> list[ToolCall]:
    """Every command in `commands_text`, run by the enabled plugin with its API, all of them
    within `budget_s` seconds; a command no enabled plugin answers, one past MAX_COMMANDS, or
    one left when the budget is spent gets NO_RESULT and an error."""
    by_api = {plugin.api: plugin for plugin in plugins.values()}
    deadline = time.monotonic() + budget_s
    calls = []
    for i, (api, argument) in enumerate(parse_commands(commands_text)):
        plugin, left = by_api.get(api), deadline - time.monotonic()
        if plugin is None:
            error = f"no enabled plugin answers {api}"
        elif i >= MAX_COMMANDS:
            error = f"more than {MAX_COMMANDS} commands in one turn"
        elif left <= 0:
            error = f"the turn's {budget_s:g} s for tools are spent"
        else:
            calls.append(plugin.call(argument, timeout_s=left))
            continue
        calls.append(ToolCall(api, argument, NO_RESULT, result_line(api, argument, NO_RESULT), error))
    return calls


def run_commands(commands_text: str, enabled: Optional[set[str]] = None) -> list[str]:
    """Result lines of the built-in tools for the commands in `commands_text` that are enabled
    (`enabled`: plugin names; None: all); other commands are skipped (data generation)."""
    tools = {t.name: t for t in TOOLS.values() if enabled is None or t.name in enabled}
    return [call.line for call in call_tools(commands_text, tools) if call.api in {t.api for t in tools.values()}]
