"""The calculator tool the model may call between <|python_start|> and <|python_end|>.

It accepts two forms and nothing else:
  * arithmetic on number literals: + - * / ( ) and unary +/-, e.g. `(12.5 + 3) * 4 / 2`  (no `**`;
    thousands separators such as `1,250` are accepted);
  * counting a letter in a string literal: `'strawberry'.count('r')`.

The text is parsed with `ast` and walked by a tiny interpreter that knows only those nodes, so nothing the
model writes is ever executed as Python. Work is bounded: the expression length is capped before parsing
and every intermediate number is capped in size, so a 10 MB string or a product with a thousand digits is
refused instead of computed. Any refusal or error returns None (the engine then forces no output).
"""
from __future__ import annotations

import ast
import math

MAX_EXPRESSION_CHARS = 1000    # longer text is refused before parsing
MAX_MAGNITUDE = 1e18           # every intermediate result must stay below this in absolute value
MAX_NODES = 200                # bounded work even for short but deeply nested input

_ARITHMETIC_CHARS = set("0123456789+-*/(). \t")
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


class _Refused(Exception):
    pass


def _check(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("not finite")
    if abs(value) >= MAX_MAGNITUDE:
        raise _Refused("too large")
    return value


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _check(_BINARY[type(node.op)](left, right))  # operands < 1e18, so a product stays cheap
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and type(node.func.value.value) is str
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is str):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _format(value) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return format(value, ".10g")
    return str(value)


def calculate(expression: str) -> str | None:
    """The result as text, or None when the expression is refused or invalid. Never raises."""
    try:
        if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
            return None
        expression = expression.strip()
        if not expression:
            return None
        is_count = ".count(" in expression
        if not is_count:
            expression = expression.replace(",", "")  # "1,250 * 3": thousands separators, as GSM8K writes them
            if not set(expression) <= _ARITHMETIC_CHARS:
                return None
        if "**" in expression or "//" in expression:
            return None
        tree = ast.parse(expression, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
            return None
        value = _evaluate(tree)
        if is_count != isinstance(tree.body, ast.Call):  # count must be the whole expression
            return None
        return _format(value)
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, MemoryError, RecursionError,
            TypeError):
        return None
    except Exception:  # the engine must never crash on model output
        return None
