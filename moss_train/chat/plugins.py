"""The tools MOSS calls by command: calculator and equation solver, computed with sympy.

Commands look like ``Calculate("24*15")`` and ``Solve("3x+5=20;x-y=1")`` (moss-003's APIs); each
tool returns the result line(s) that go into the ``<|Results|>`` field, in moss-003's layout::

    Calculate("24*15") => '360'
    Solve("3x+5=20") =>
    x = 5

Expressions are parsed by a small whitelisting parser into sympy objects — never ``eval`` and
never sympy's string parser (which evaluates Python) — so a hostile command cannot run code;
sizes, nesting and exponents are bounded so none can hang. Any failure reads ``No result.``,
as in moss-003.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy

NO_RESULT = "No result."
MAX_CHARS = 256
MAX_DEPTH = 24
MAX_EXPONENT = 512
MAX_RESULT_BITS = 1 << 16  # bounds a power's size before sympy computes it
_FUNCTIONS = {
    "sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
    "log": sympy.log, "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs,
}
_CONSTANTS = {"pi": sympy.pi, "e": sympy.E}
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|([A-Za-z]+)|(\*\*|[-+*/^(),=×÷]))")


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    out, at = [], 0
    text = text.rstrip()
    while at < len(text):
        match = _TOKEN.match(text, at)
        if not match:
            raise ExpressionError(f"unexpected {text[at:at + 10]!r}")
        number, name, op = match.groups()
        out.append(("num", number) if number else ("name", name) if name else ("op", {"×": "*", "÷": "/", "**": "^"}.get(op, op)))
        at = match.end()
    return out


class _Parser:
    """expr := term (+|- term)*; term := unary ((*|/|implicit) unary)*; unary := (+|-) unary | power;
    power := atom (^ unary)?; atom := number | constant | variable | function(expr) | (expr)."""

    def __init__(self, tokens: list[tuple[str, str]], variables: bool):
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
        return self.tokens[self.at - 1]

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
            elif self.at < len(self.tokens) and (self.tokens[self.at][0] in ("num", "name") or self.peek("(")):
                value = value * self.unary()  # implicit: 2x, 3(x+1)
            else:
                return value

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


def format_number(value) -> str:
    """An exact integer as digits, anything else as a decimal with up to 10 significant digits."""
    value = sympy.nsimplify(value) if isinstance(value, sympy.Float) and value == int(value) else value
    if value.is_Integer:
        return str(int(value))
    if not value.is_finite:
        raise ExpressionError("not a finite number")
    number = complex(sympy.N(value, 15))
    if abs(number.imag) > 1e-12:
        raise ExpressionError("complex result")
    return f"{number.real:.10g}"


def calculate(expression: str) -> str:
    """The calculator's answer to `expression`, or NO_RESULT."""
    try:
        return format_number(parse_expression(expression))
    except (ExpressionError, ZeroDivisionError, TypeError, ValueError, OverflowError, ArithmeticError):
        return NO_RESULT


def solve(equations: str) -> str:
    """Solutions of ';'-separated equations as "x = 5" lines (one solution), or NO_RESULT."""
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
    except (ExpressionError, ZeroDivisionError, TypeError, ValueError, NotImplementedError, ArithmeticError):
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


@dataclass(frozen=True)
class Tool:
    plugin: str  # the capability name in the meta instruction (format.PLUGIN_CAPABILITIES)
    api: str  # the command name
    run: callable
    multiline: bool  # moss-003 puts a solver's answer on the lines after "=>"

    def result_line(self, argument: str, answer: str | None = None) -> str:
        """The results line(s) for one command, in moss-003's layout (`answer`: already run)."""
        answer = self.run(argument) if answer is None else answer
        call = f'{self.api}("{argument}")'
        return f"{call} =>\n{answer}" if self.multiline else f"{call} => '{answer}'"


TOOLS = {
    "Calculate": Tool("calculator", "Calculate", calculate, multiline=False),
    "Solve": Tool("equation_solver", "Solve", solve, multiline=True),
}
_COMMAND = re.compile(r'(\w+)\("((?:[^"\\]|\\.)*)"\)')


def parse_commands(commands_text: str) -> list[tuple[str, str]]:
    """(api, argument) pairs of a commands field body, e.g. ``Calculate("1+1")``."""
    return _COMMAND.findall(commands_text or "")


def run_commands(commands_text: str, enabled: set[str] | None = None) -> list[str]:
    """Result lines for the known, enabled commands in `commands_text` (others are skipped)."""
    lines = []
    for api, argument in parse_commands(commands_text):
        tool = TOOLS.get(api)
        if tool is not None and (enabled is None or tool.plugin in enabled):
            lines.append(tool.result_line(argument))
    return lines
