"""A static check of every TensorRT use in the adapter's sources, class by class, against the
installed TensorRT module's pybind11 bindings.

How a receiver's class is known: from annotations and from the bindings themselves.

- A parameter or ``self`` attribute annotated with one of trt_module.py's ``Trt*`` aliases
  (``TrtEngine = Annotated[Any, "ICudaEngine"]``) holds that class; ``ModuleType`` (and any
  parameter named ``trt``) holds the TensorRT module.
- A local gets the class of what made it: ``trt.Runtime(...)`` is a Runtime, and
  ``engine.create_execution_context(config)`` is what that method's pybind11 signature
  returns (``-> ...IExecutionContext``); a property gives what its getter's signature returns;
  a call of the project's own function gives its annotated return type (tuples unpacked).

Then, for each use on a value of known class: the attribute exists on that class; a property
is read or assigned (assigned only if it has a setter), never called; a method is called,
never merely read; the call's arguments fit one of the method's signatures (parsed from its
``__doc__``: ``name(self: C, memory: int, size: int) -> None``; an overloaded method lists
each). Paths from the module (``trt.TensorIOMode.INPUT``) must resolve. Every use is returned
as ``Class.attr`` (or the module path) so the caller can check it is declared.

Blind spots, by construction: a TensorRT object reached only through a container, a lambda,
``getattr`` with a computed name, or an unannotated parameter. The last is refused: a
parameter annotated bare ``Any`` in these files is reported, so a TensorRT object passed to a
function must carry its alias.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Inst:
    """An instance of TensorRT class ``cls`` (a path from the module: "ILogger.Severity")."""

    cls: str


@dataclass(frozen=True)
class Path:
    """The TensorRT module ("") or an attribute path from it."""

    path: str


@dataclass(frozen=True)
class Tup:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Own:
    """``self`` inside one of the project's classes: its annotated attributes."""

    attrs: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class Signature:
    params: tuple[tuple[str, bool], ...]  # (name, has a default), self excluded
    returns: str


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    uses: set[str] = field(default_factory=set)


def aliases(trt_module_source: str) -> dict[str, str]:
    """``TrtX = Annotated[Any, "Cls"]`` definitions: alias -> class path."""
    found: dict[str, str] = {}
    for node in ast.parse(trt_module_source).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "Annotated"
                and isinstance(node.value.slice, ast.Tuple)):
            last = node.value.slice.elts[-1]
            if isinstance(last, ast.Constant) and isinstance(node.targets[0], ast.Name):
                found[node.targets[0].id] = str(last.value)
    return found


def _lookup(trt: ModuleType, path: str) -> tuple[bool, Any]:
    obj: Any = trt
    for part in path.split(".") if path else []:
        if not hasattr(obj, part):
            return False, None
        obj = getattr(obj, part)
    return True, obj


def _split_params(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def signatures(obj: Any, name: str, bound: bool) -> list[Signature] | None:
    """The call signatures of a binding (from its pybind11 ``__doc__``) or of a Python
    function; None where neither says (then arguments are not checked)."""
    doc = getattr(obj, "__doc__", None) or ""
    line = re.compile(rf"^\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$")
    found = [m for m in map(line.match, doc.splitlines()) if m]
    if len(found) > 1:  # overloaded: the first line is the (*args, **kwargs) dispatcher
        found = [m for m in found if "*args" not in m.group(1)]
    result = []
    for match in found:
        params = _split_params(match.group(1))
        if bound and params:
            params = params[1:]
        result.append(Signature(
            tuple((p.split(":")[0].split("=")[0].strip(), "=" in p) for p in params),
            match.group(2)))
    if result:
        return result
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())[1 if bound else 0:]
    return [Signature(tuple((p.name, p.default is not p.empty) for p in params), "")]


def _fits(sig: Signature, call: ast.Call) -> bool:
    positional = len(call.args)
    if positional > len(sig.params):
        return False
    given = {name for name, _ in sig.params[:positional]}
    names = {name for name, _ in sig.params}
    keywords = {k.arg for k in call.keywords}
    if not keywords <= names - given:
        return False
    return all(has_default or name in keywords
               for name, has_default in sig.params[positional:])


class Checker:
    def __init__(self, trt: ModuleType, alias_map: dict[str, str],
                 sources: dict[str, str]) -> None:
        self.trt = trt
        self.aliases = alias_map
        self.trees = {name: ast.parse(text) for name, text in sources.items()}
        # The project's own functions, by name: their return annotations.
        self.returns: dict[str, ast.expr] = {}
        for tree in self.trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and node.returns is not None:
                    self.returns.setdefault(node.name, node.returns)
        self.report = Report()
        self.file = ""

    # --- types ------------------------------------------------------------------------

    def from_annotation(self, node: ast.expr | None) -> Any:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node = ast.parse(node.value, mode="eval").body
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return Inst(self.aliases[node.id])
            return Path("") if node.id == "ModuleType" else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.from_annotation(node.left) or self.from_annotation(node.right)
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "tuple" and isinstance(node.slice, ast.Tuple)):
            return Tup(tuple(self.from_annotation(e) for e in node.slice.elts))
        return None

    def _from_doc(self, text: str) -> Any:
        name = re.split(r"\.|::", text.strip())[-1]
        ok, obj = _lookup(self.trt, name)
        return Inst(name) if ok and isinstance(obj, type) else None

    def typeof(self, node: ast.expr, scope: dict[str, Any]) -> Any:
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.typeof(node.value, scope)
            if isinstance(base, Own):
                return base.attrs.get(node.attr)
            if isinstance(base, Path) and not node.attr.startswith("__"):
                return Path(f"{base.path}.{node.attr}".lstrip("."))
            if isinstance(base, Inst):
                ok, member = _lookup(self.trt, f"{base.cls}.{node.attr}")
                if ok and isinstance(member, property) and member.fget is not None:
                    fget_doc = (member.fget.__doc__ or "").split("->")
                    return self._from_doc(fget_doc[-1]) if len(fget_doc) > 1 else None
            return None
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                base = self.typeof(func.value, scope)
                if isinstance(base, Inst):
                    ok, member = _lookup(self.trt, f"{base.cls}.{func.attr}")
                    sigs = signatures(member, func.attr, bound=True) if ok else None
                    fitting = [s for s in sigs or [] if _fits(s, node)]
                    return self._from_doc(fitting[0].returns) if fitting else None
            callee = self.typeof(func, scope)
            if isinstance(callee, Path):
                ok, obj = _lookup(self.trt, callee.path)
                return Inst(callee.path) if ok and isinstance(obj, type) else None
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            return self.from_annotation(self.returns.get(name))
        return None

    # --- checks -----------------------------------------------------------------------

    def problem(self, node: ast.AST, text: str) -> None:
        self.report.problems.append(f"{self.file}:{getattr(node, 'lineno', '?')}: {text}")

    def check_expr(self, root: ast.AST, scope: dict[str, Any]) -> None:
        called = {id(n.func) for n in ast.walk(root) if isinstance(n, ast.Call)}
        for node in ast.walk(root):
            if isinstance(node, ast.Attribute):
                self.check_attribute(node, scope, id(node) in called)
            if isinstance(node, ast.Call) and any(
                    isinstance(a, ast.Starred) for a in node.args) is False:
                self.check_call(node, scope)

    def check_attribute(self, node: ast.Attribute, scope: dict[str, Any],
                        called: bool) -> None:
        base = self.typeof(node.value, scope)
        if isinstance(base, Path):
            if node.attr.startswith("__") and node.attr != "__version__":
                return
            path = f"{base.path}.{node.attr}".lstrip(".")
            ok, _ = _lookup(self.trt, path)
            self.report.uses.add(path)
            if not ok:
                self.problem(node, f"trt.{path} does not exist in {self.trt.__name__}")
            return
        if not isinstance(base, Inst) or node.attr.startswith("__"):
            return
        use = f"{base.cls}.{node.attr}"
        self.report.uses.add(use)
        ok, member = _lookup(self.trt, use)
        if not ok:
            self.problem(node, f"{use} does not exist: {base.cls} has no '{node.attr}'")
            return
        is_property = isinstance(member, property)
        if isinstance(node.ctx, ast.Store):
            if not is_property or member.fset is None:
                self.problem(node, f"{use} is assigned but is not a settable property")
        elif is_property and called:
            self.problem(node, f"{use} is a property, and is called")
        elif not is_property and callable(member) and not called:
            self.problem(node, f"{use} is a method, and is not called")

    def check_call(self, node: ast.Call, scope: dict[str, Any]) -> None:
        if any(k.arg is None for k in node.keywords):
            return
        func = node.func
        if not isinstance(func, ast.Attribute) or func.attr.startswith("__"):
            return
        base = self.typeof(func.value, scope)
        if isinstance(base, Inst):
            ok, member = _lookup(self.trt, f"{base.cls}.{func.attr}")
            if not ok or isinstance(member, property):
                return  # reported by check_attribute
            sigs, what = signatures(member, func.attr, bound=True), f"{base.cls}.{func.attr}"
        elif isinstance(base, Path):
            path = f"{base.path}.{func.attr}".lstrip(".")
            ok, member = _lookup(self.trt, path)
            if not ok:
                return
            if isinstance(member, type):
                sigs = signatures(getattr(member, "__init__", None), "__init__", bound=True)
            else:
                sigs = signatures(member, func.attr, bound=False)
            what = f"trt.{path}"
        else:
            return
        if sigs is not None and not any(_fits(s, node) for s in sigs):
            given = len(node.args) + len(node.keywords)
            expected = " or ".join(f"({', '.join(n for n, _ in s.params)})" for s in sigs)
            self.problem(node, f"{what} called with {given} argument(s); its binding takes "
                               f"{expected}")

    # --- statements and scopes ----------------------------------------------------------

    def run(self) -> Report:
        for name, tree in self.trees.items():
            self.file = name
            self.block(tree.body, {}, None)
        return self.report

    def block(self, body: list[ast.stmt], scope: dict[str, Any], own: Own | None) -> None:
        for stmt in body:
            self.statement(stmt, scope, own)

    def statement(self, stmt: ast.stmt, scope: dict[str, Any], own: Own | None) -> None:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            self.function(stmt, scope, own)
        elif isinstance(stmt, ast.ClassDef):
            for base in stmt.bases:
                self.check_expr(base, scope)
            attrs: dict[str, Any] = {}
            for node in ast.walk(stmt):
                if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute)
                        and isinstance(node.target.value, ast.Name)
                        and node.target.value.id == "self"):
                    attrs[node.target.attr] = self.from_annotation(node.annotation)
            self.block(stmt.body, dict(scope), Own(attrs))
        elif isinstance(stmt, ast.If | ast.While):
            self.check_expr(stmt.test, scope)
            self.block(stmt.body + stmt.orelse, scope, own)
        elif isinstance(stmt, ast.For):
            self.check_expr(stmt.iter, scope)
            self.block(stmt.body + stmt.orelse, scope, own)
        elif isinstance(stmt, ast.With):
            for item in stmt.items:
                self.check_expr(item.context_expr, scope)
                if isinstance(item.optional_vars, ast.Name):
                    scope[item.optional_vars.id] = self.typeof(item.context_expr, scope)
            self.block(stmt.body, scope, own)
        elif isinstance(stmt, ast.Try):
            self.block(stmt.body, scope, own)
            for handler in stmt.handlers:
                self.block(handler.body, scope, own)
            self.block(stmt.orelse + stmt.finalbody, scope, own)
        else:
            self.check_expr(stmt, scope)
            self.bind(stmt, scope, own)

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, outer: dict[str, Any],
                 own: Own | None) -> None:
        scope = dict(outer)
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        for i, arg in enumerate(args):
            if i == 0 and own is not None and arg.arg == "self":
                scope["self"] = own
                continue
            annotation = arg.annotation
            if isinstance(annotation, ast.Name) and annotation.id == "Any":
                self.problem(arg, f"parameter '{arg.arg}' of {node.name}() is annotated Any: "
                                  f"give a TensorRT object its Trt* alias, anything else its type")
            typed = self.from_annotation(annotation)
            scope[arg.arg] = typed if typed is not None or arg.arg != "trt" else Path("")
        self.block(node.body, scope, None)

    def bind(self, stmt: ast.stmt, scope: dict[str, Any], own: Own | None) -> None:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            scope[stmt.target.id] = self.from_annotation(stmt.annotation)
        elif isinstance(stmt, ast.Assign):
            value = self.typeof(stmt.value, scope)
            for target in stmt.targets:
                self.assign(target, value, scope)

    def assign(self, target: ast.expr, value: Any, scope: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            scope[target.id] = value
        elif isinstance(target, ast.Tuple):
            items = value.items if isinstance(value, Tup) else (None,) * len(target.elts)
            for element, item in zip(target.elts, items, strict=False):
                self.assign(element, item, scope)
        elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
              and target.value.id == "self" and isinstance(value, Inst | Path)):
            own = scope.get("self")
            if isinstance(own, Own) and own.attrs.get(target.attr) is None:
                self.problem(target, f"self.{target.attr} holds a TensorRT {value}: annotate "
                                     f"it where it is assigned, so its uses are checked")


def check(trt: ModuleType, trt_module_source: str, sources: dict[str, str]) -> Report:
    return Checker(trt, aliases(trt_module_source), sources).run()
