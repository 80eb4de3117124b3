"""Static checks of emu's Julia package, read from fatou's syntax tree: no Julia runtime needed.

`fatou parse --to sexpr FILE` prints JuliaSyntax's s-expression of a file; `parse_sexpr` reads it
into nested lists (symbols as `str`, string literals as `JuliaString`), `read_julia_file` collects
what one file defines, includes, imports and exports, and the `check_*` functions return a list of
problems (empty when all is well), each naming the file and what is wrong, so a failing test says
exactly what to fix. tests/test_julia_structure.py runs them on julia/ and scripts/ and on broken
snippets (to show they do fail).

What is checked:
  - every file parses (no error nodes, no parser diagnostics);
  - every `include` target exists, and every file in src/ is reached from the module's entry file;
  - every `using`/`import` of a package is declared: src/ in [deps]; ext/ in [deps] or the
    extension's own [weakdeps] triggers; test/ in [deps] or [extras] named in [targets].test,
    guarded (`if Base.find_package(...)`) loads included: Pkg.test() installs only that target, so
    a guarded load of a package outside it never runs; scripts/ in the development environment's
    Project.toml (or a Julia stdlib);
  - every exported name is defined in its module (or imported by name into it);
  - every (name, arity) the Python bridge calls (`emu.julia.JULIA_CALLS`) has a method in src/
    accepting that many positional arguments with no required keywords;
  - Project.toml: UUIDs well formed and equal to the General registry's for known packages,
    [compat] for every non-stdlib dependency and julia, CUDA bounded below v6, [weakdeps] and
    [extensions] consistent with ext/ files; the development Project.toml and emu's
    juliapkg.json point at the package with its UUID.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Julia's standard libraries (their UUIDs are fixed by Julia itself).
STDLIBS = {
    "Base64": "2a0f44e3-6c83-55bd-87e4-b1978d98bd5f",
    "Dates": "ade2ca70-3891-5945-98fb-dc099432e06a",
    "Distributed": "8ba89e20-285c-5b6f-9357-94700520ee1b",
    "InteractiveUtils": "b77e0a4c-d291-57a0-90e8-8db25a27a240",
    "Libdl": "8f399da3-3557-5675-b5ff-fb832c97cbdb",
    "LinearAlgebra": "37e2e46d-f89d-539d-b4ee-838fcccc9c8e",
    "Logging": "56ddb016-857b-54e1-b83d-db4d58db5568",
    "Markdown": "d6f4376e-aef5-505a-96c1-9c027394607a",
    "Pkg": "44cfe95a-1eb2-52ea-b672-e2afdf69b78f",
    "Printf": "de0858da-6303-5e67-8744-51eddeeeb8d7",
    "Random": "9a3f8284-a2c9-5f02-9a11-845980a1fd5c",
    "SHA": "ea8e919c-243c-51af-8825-aaa63cd721ce",
    "Serialization": "9e88b42a-f829-5b0c-bbe9-9e923198166b",
    "SparseArrays": "2f01184e-e22b-5df5-ae63-d93ebab69eaf",
    "Statistics": "10745b16-79ce-11e8-11f9-7d13ad32a3b2",
    "TOML": "fa267f1f-6049-4f14-aa54-33bafae1ed76",
    "Test": "8dfed614-e22c-5e08-85e1-65c5234f0b40",
    "UUIDs": "cf7118a7-6976-5b1a-9a39-7adc72f591a4",
}
# Registered packages emu's Julia code may use: name -> UUID in the General registry. A package not
# listed here fails the check until its UUID is recorded (copied from the registry, not from our files).
REGISTRY = {
    "AbstractFFTs": "621f4979-c628-5d54-868e-fcf4e3e8185c",
    "Adapt": "79e6a3ab-5dfb-504d-930d-738a2a938a0e",
    "Atomix": "a9b6321e-bd34-4604-b9c9-b65b8de01458",
    "BenchmarkTools": "6e4b80f9-dd63-53aa-95a3-0cdb28fa8baf",
    "CUDA": "052768ef-5323-5732-b1bb-66c8b64840ba",
    "DocStringExtensions": "ffbed154-4ef7-542d-bbb7-c09d3a79fcae",
    "FFTW": "7a1cc6ca-52ef-59f5-83cd-3a7055c09341",
    "GPUArrays": "0c68f7d7-f131-5f86-a1c3-88cf8149b2d7",
    "GPUArraysCore": "46192b85-c4d5-4398-a991-12ede77f4527",
    "HDF5": "f67ccb44-e63f-5c2f-98bd-6dc0ccc4ba2f",
    "JSON": "682c06a0-de6a-54ab-a142-c8b1cf79cde6",
    "JSON3": "0f8b85d8-7281-11e9-16c2-39a750bddbf1",
    "KernelAbstractions": "63c18a36-062a-441e-b654-da1e3ab1ce7c",
    "PrecompileTools": "aea7be01-6a6a-4083-8856-8a6e6704d82a",
    "PythonCall": "6099a3de-0909-46bc-b1f4-468b9a2dfc0d",
    "StaticArrays": "90137ffa-7385-5640-81b9-e52037218182",
}
KNOWN_UUIDS = {**STDLIBS, **REGISTRY}
BUILTIN_MODULES = {"Base", "Core", "Main"}


class JuliaString(str):
    """A string literal in the s-expression (as opposed to a symbol)."""


# -- s-expressions ----------------------------------------------------------------------------------

def parse_sexpr(text: str) -> list:
    """Reads fatou's `--to sexpr` output: `(head arg ...)` lists, symbols, "strings", 'c' chars."""
    position, length = 0, len(text)
    stack: list[list] = [[]]
    while position < length:
        char = text[position]
        if char.isspace():
            position += 1
        elif char == "(":
            stack.append([])
            position += 1
        elif char == ")":
            if len(stack) == 1:
                raise ValueError(f"unbalanced ')' at {position}")
            done = stack.pop()
            stack[-1].append(done)
            position += 1
        elif char == '"':
            position += 1
            chars = []
            while position < length and text[position] != '"':
                if text[position] == "\\" and position + 1 < length:
                    escape = text[position + 1]
                    chars.append({"n": "\n", "t": "\t", "r": "\r", "0": "\0"}.get(escape, escape))
                    position += 2
                else:
                    chars.append(text[position])
                    position += 1
            stack[-1].append(JuliaString("".join(chars)))
            position += 1
        elif char == "'" and stack[-1][:1] == ["char"]:  # a character literal such as '(' or '\''
            end = text.index("'", position + 3) if text[position + 1] == "\\" else position + 2
            stack[-1].append(text[position:end + 1])
            position = end + 1
        else:
            end = position
            while end < length and not text[end].isspace() and text[end] not in '()"':
                end += 1
            stack[-1].append(text[position:end])
            position = end
    if len(stack) != 1:
        raise ValueError("unbalanced '(' in s-expression")
    return stack[0]


def fatou_sexpr(path: Path) -> tuple[list, list[str]]:
    """(tree, diagnostics) of a Julia file; raises FileNotFoundError when fatou is missing."""
    exe = shutil.which("fatou")
    if exe is None:
        raise FileNotFoundError("fatou is not installed (pip install fatou)")
    result = subprocess.run([exe, "parse", "--no-config", "--to", "sexpr", "--color", "never", str(path)],
                            capture_output=True, text=True)
    diagnostics = [line for line in (result.stderr + "\n" + result.stdout).splitlines()
                   if line.startswith("diagnostic") or line.startswith("error")]
    stdout = result.stdout
    # fatou may append diagnostics after the tree on stdout; keep the tree part only.
    tree_text = stdout.split("\ndiagnostic", 1)[0]
    cut = tree_text.rfind(")")
    tree_text = tree_text[:cut + 1] if cut >= 0 else tree_text
    if result.returncode != 0:
        diagnostics.append(f"fatou parse exited with {result.returncode}: {result.stderr.strip()[:500]}")
    tree = _normalise(parse_sexpr(tree_text))
    return (tree[0] if tree else ["toplevel"]), diagnostics


def _normalise(node):
    """Drops the trailing-comma flag from heads (`call-,` is a call written `f(a, b,)`)."""
    if not isinstance(node, list):
        return node
    children = [_normalise(child) for child in node]
    if children and isinstance(children[0], str) and not isinstance(children[0], JuliaString):
        if children[0].endswith("-,"):
            children[0] = children[0][:-2]
    return children


# -- what one file holds ----------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    required: int
    optional: int
    vararg: bool
    required_keywords: tuple[str, ...]
    path: Path

    def accepts(self, arity: int) -> bool:
        if self.required_keywords:
            return False
        if arity < self.required:
            return False
        return self.vararg or arity <= self.required + self.optional


@dataclass
class ModuleFacts:
    """What one Julia module's files hold (its own file plus everything it includes)."""

    name: str
    path: Path
    definitions: set[str] = field(default_factory=set)
    methods: list[Method] = field(default_factory=list)
    kernels: set[str] = field(default_factory=set)
    exports: list[tuple[str, Path]] = field(default_factory=list)
    imports: list[tuple[str, Path]] = field(default_factory=list)     # package roots used
    optional_imports: list[tuple[str, Path]] = field(default_factory=list)  # used inside `if` (guarded loads)
    imported_names: set[str] = field(default_factory=set)             # `using X: a, b` names
    includes: list[tuple[Path, Path | None, str]] = field(default_factory=list)  # (file, target, text)
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    submodules: list["ModuleFacts"] = field(default_factory=list)


def _is_list(node) -> bool:
    return isinstance(node, list) and bool(node)


def _head(node):
    return node[0] if _is_list(node) else None


def _symbol(node) -> str | None:
    """The plain name of a symbol node (`f`, `f!`), None for anything else."""
    if isinstance(node, str) and not isinstance(node, JuliaString) and re.match(r"^[^\d\W]|^[_!\u0080-\U0010ffff]", node):
        return node
    return None


def _contains_error(node) -> bool:
    if not _is_list(node):
        return False
    head = node[0]
    if isinstance(head, str) and (head == "error" or head.startswith("error-")):
        return True
    return any(_contains_error(child) for child in node[1:])


def _signature(node):
    """Strips `where` clauses and return-type annotations off a method signature: the `(call ...)`."""
    while _is_list(node) and node[0] in ("where", "::-i"):
        node = node[1]
    return node


def _method(signature, path: Path) -> Method | None:
    """A Method from a `(call NAME args...)` signature; None for operators on other modules' types,
    callable objects `(p::T)(x)` and qualified extensions such as `Base.show(...)`."""
    if not _is_list(signature) or signature[0] not in ("call", "call-i"):
        return None
    if signature[0] == "call-i":  # infix definition such as a ⊗ b = ...
        name, arguments = signature[2], [signature[1], *signature[3:]]
    else:
        name, arguments = signature[1], signature[2:]
    if _is_list(name) and name[0] == "curly":  # Problem{T}(x) constructors
        name = name[1]
    name = _symbol(name)
    if name is None:
        return None
    required = optional = 0
    vararg = False
    required_keywords: list[str] = []
    for argument in arguments:
        head = _head(argument)
        if head == "parameters":
            for keyword in argument[1:]:
                keyword_head = _head(keyword)
                if keyword_head in ("=", "kw"):
                    continue
                if keyword_head == "...":
                    continue
                label = keyword if isinstance(keyword, str) else (keyword[1] if _is_list(keyword) else "?")
                required_keywords.append(str(label))
        elif head in ("=", "kw"):
            optional += 1
        elif head == "...":
            vararg = True
        elif head == "::-i" and _is_list(argument[-1]) and argument[-1][:2] == ["curly", "Vararg"]:
            vararg = True
        else:
            required += 1
    return Method(name, required, optional, vararg, tuple(required_keywords), path)


def _import_roots(node) -> list[tuple[str | None, list[str]]]:
    """(package root or None for relative imports, names imported) of a `using`/`import` node."""
    found = []
    for clause in node[1:]:
        names: list[str] = []
        if _head(clause) == ":":
            path_node = clause[1]
            names = [str(item[-1]) for item in clause[2:] if _head(item) in ("importpath", "as")]
        elif _head(clause) == "as":
            path_node = clause[1]
        else:
            path_node = clause
        if _head(path_node) != "importpath":
            continue
        parts = [str(part) for part in path_node[1:]]
        root = None if not parts or parts[0] == "." else parts[0]
        found.append((root, [str(name) for name in names]))
    return found


def _include_target(call, path: Path) -> tuple[Path | None, str]:
    """The file an `include(...)` call names, when it is a literal or joinpath(@__DIR__, literals...)."""
    argument = call[2] if len(call) > 2 else None
    text = repr(argument)
    if _head(argument) == "string" and all(isinstance(part, JuliaString) for part in argument[1:]):
        return path.parent / "".join(argument[1:]), "".join(argument[1:])
    if _head(argument) == "call" and argument[1] == "joinpath":
        parts = []
        for item in argument[2:]:
            if _is_list(item) and item[0] == "macrocall" and item[1:] == ["@__DIR__"]:
                parts.append(str(path.parent))
            elif _head(item) == "string" and all(isinstance(part, JuliaString) for part in item[1:]):
                parts.append("".join(item[1:]))
            else:
                return None, text
        return Path(*parts), "/".join(parts[1:])
    return None, text


def _collect(node, module: ModuleFacts, path: Path, *, top: bool, visited: set[Path], root: Path,
             guarded: bool = False) -> None:
    """Walks statements of `module`, following includes into other files (`guarded`: inside an `if`)."""
    if not _is_list(node):
        return
    head = node[0]
    if head in ("toplevel", "toplevel-;", "block"):
        for child in node[1:]:
            _collect(child, module, path, top=top, visited=visited, root=root, guarded=guarded)
        return
    if head == "doc":
        _collect(node[-1], module, path, top=top, visited=visited, root=root, guarded=guarded)
        return
    if head == "module":
        name = str(node[1]) if node[1] not in ("baremodule",) else str(node[2])
        submodule = ModuleFacts(name, path, files=[path])
        module.definitions.add(name)
        module.submodules.append(submodule)
        _collect(node[-1], submodule, path, top=True, visited=visited, root=root)
        return
    if head in ("using", "import"):
        for package, names in _import_roots(node):
            if package is not None and package not in BUILTIN_MODULES:
                (module.optional_imports if guarded else module.imports).append((package, path))
            module.imported_names.update(names)
            if head == "import" and package is not None and not names:
                module.imported_names.add(package)
            if head == "using" and package is not None:
                module.imported_names.add(package)
        return
    if head in ("export", "public"):
        if head == "export":
            module.exports.extend((str(name), path) for name in node[1:] if isinstance(name, str))
        return
    if head == "call" and len(node) > 1 and node[1] == "include":
        target, text = _include_target(node, path)
        module.includes.append((path, target, text))
        if target is None:
            module.problems.append(f"{path}: include({text}) is not a literal path the check can follow")
        elif not target.is_file():
            module.problems.append(f"{path}: include target {text!r} does not exist ({target})")
        elif target.resolve() in visited:
            module.problems.append(f"{path}: {text!r} is included twice")
        else:
            visited.add(target.resolve())
            module.files.append(target)
            tree, diagnostics = fatou_sexpr(target)
            module.problems.extend(_parse_problems(target, tree, diagnostics))
            _collect(tree, module, target, top=True, visited=visited, root=root)
        return
    if head in ("function", "function-="):
        signature = node[1]
        if isinstance(signature, str):  # `function f end`
            module.definitions.add(signature)
            return
        call = _signature(signature)
        method = _method(call, path)
        if method is not None:
            module.definitions.add(method.name)
            module.methods.append(method)
        return
    if head == "macro":
        call = _signature(node[1])
        if _is_list(call) and _symbol(call[1]):
            module.definitions.add("@" + call[1])
        return
    if head == "macrocall":
        macro = node[1]
        if macro == "@kernel" or (_is_list(macro) and macro[-1] == "@kernel"):
            for child in node[2:]:
                if _head(child) in ("function", "function-="):
                    method = _method(_signature(child[1]), path)
                    if method is not None:
                        module.definitions.add(method.name)
                        module.kernels.add(method.name)
            return
        for child in node[2:]:
            _collect(child, module, path, top=top, visited=visited, root=root, guarded=guarded)
        return
    if head in ("struct", "struct-mut"):
        name = _type_name(node[1])
        if name:
            module.definitions.add(name)
        return
    if head in ("abstract", "primitive"):
        name = _type_name(node[1])
        if name:
            module.definitions.add(name)
        return
    if head in ("const", "global"):
        for child in node[1:]:
            _collect(child, module, path, top=top, visited=visited, root=root, guarded=guarded)
        return
    if head == "=" and top:
        for name in _assigned_names(node[1]):
            module.definitions.add(name)
        return
    if head in ("if", "elseif", "let") and top:  # @static if / top-level if: definitions in either branch
        for child in node[1:]:
            _collect(child, module, path, top=top, visited=visited, root=root, guarded=guarded or head != "let")


def _type_name(node) -> str | None:
    while _is_list(node) and node[0] in ("<:", "curly", "::-i"):
        node = node[1]
    return _symbol(node)


def _assigned_names(node) -> list[str]:
    if _symbol(node):
        return [node]
    if _is_list(node) and node[0] in ("tuple", "tuple-p"):
        return [name for child in node[1:] for name in _assigned_names(child)]
    if _is_list(node) and node[0] == "::-i":
        return _assigned_names(node[1])
    return []


def _parse_problems(path: Path, tree, diagnostics: list[str]) -> list[str]:
    problems = [f"{path}: {line}" for line in diagnostics]
    if _contains_error(tree) and not diagnostics:
        problems.append(f"{path}: the syntax tree holds an error node")
    return problems


def read_module_file(path: Path) -> list[ModuleFacts]:
    """The module(s) a file defines (following its includes); a file without `module` (a script or
    test file) is returned as one pseudo-module named after the file."""
    path = Path(path)
    tree, diagnostics = fatou_sexpr(path)
    facts = ModuleFacts(f"<file {path.name}>", path, files=[path])
    facts.problems.extend(_parse_problems(path, tree, diagnostics))
    _collect(tree, facts, path, top=True, visited={path.resolve()}, root=path.parent)
    return [facts]


def all_modules(facts: ModuleFacts):
    yield facts
    for submodule in facts.submodules:
        yield from all_modules(submodule)


def _gather(facts: ModuleFacts, attribute: str) -> list:
    """An attribute gathered over a module and its submodules."""
    items: list = []
    for module in all_modules(facts):
        value = getattr(module, attribute)
        items.extend(value)
    return items


# -- checks -----------------------------------------------------------------------------------------

def check_parse(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        tree, diagnostics = fatou_sexpr(path)
        problems.extend(_parse_problems(path, tree, diagnostics))
    return problems


def check_exports(facts: ModuleFacts) -> list[str]:
    """Each module's exported names are defined in it or imported into it by name."""
    problems = []
    for module in all_modules(facts):
        for name, path in module.exports:
            if name not in module.definitions and name not in module.imported_names:
                problems.append(f"{path}: module {module.name} exports `{name}`, which it does not define")
    return problems


def check_bridge_calls(facts: ModuleFacts, calls, module_name: str = "Emu") -> list[str]:
    """Each (name, arity) the Python bridge calls has a method in module `module_name` that accepts
    that many positional arguments (and no required keywords); the name must also be exported."""
    problems = []
    modules = [m for m in all_modules(facts) if m.name == module_name]
    if not modules:
        return [f"{facts.path}: defines no module {module_name}"]
    module = modules[0]
    for name, arity in calls:
        methods = [method for method in module.methods if method.name == name]
        if not methods:
            kind = " (only as a @kernel, which is not callable with these arguments)" if name in module.kernels else ""
            problems.append(f"{module_name}.{name}: the Python bridge calls it with {arity} arguments but the "
                            f"package defines no such function{kind}")
        elif not any(method.accepts(arity) for method in methods):
            found = ", ".join(sorted({_describe(m) for m in methods}))
            problems.append(f"{module_name}.{name}: the Python bridge calls it with {arity} positional arguments; "
                            f"its methods take {found}")
    return problems


def _describe(method: Method) -> str:
    text = str(method.required)
    if method.optional:
        text += f"-{method.required + method.optional}"
    if method.vararg:
        text += "+"
    if method.required_keywords:
        text += f" and required keywords {', '.join(method.required_keywords)}"
    return f"{text} ({method.path.name})"


def check_imports(facts: ModuleFacts, allowed: set[str], where: str, own: set[str] = frozenset(),
                  optional: set[str] = frozenset()) -> list[str]:
    """Every package imported by the module's files is in `allowed` (or is the package itself), loads
    inside an `if` (e.g. guarded by `Base.find_package`) included. A guarded load of a package that is
    only in `optional` ([extras] or [weakdeps] of a test file's project) is reported as unreachable."""
    problems = []
    for package, path in _gather(facts, "imports"):
        if package not in own and package not in allowed:
            problems.append(f"{path}: `using`/`import` {package}, which is not declared in {where}")
    for package, path in _gather(facts, "optional_imports"):
        if package in own or package in allowed:
            continue
        if package in optional:
            problems.append(f"{path}: `using`/`import` {package} (guarded by an `if`) is in [extras] or [weakdeps] "
                            f"but not in {where}: Pkg.test() never installs it, so the guarded tests never run; "
                            f"add {package} to [targets].test")
        else:
            problems.append(f"{path}: `using`/`import` {package} (guarded by an `if`), which is not declared in "
                            f"{where}, [extras] or [weakdeps]")
    return problems


def check_unreached(entry: ModuleFacts, folder: Path) -> list[str]:
    reached = {path.resolve() for path in _gather(entry, "files")} | {entry.path.resolve()}
    return [f"{path}: never included from {entry.path.name}" for path in sorted(folder.rglob("*.jl"))
            if path.resolve() not in reached]


def _compat_ok(text: str) -> bool:
    specifier = r"\s*(\^|~|=|>=|≥|<|<=|≤)?\s*\d+(\.\d+){0,2}\s*"
    hyphen = r"\s*\d+(\.\d+){0,2}\s+-\s+\d+(\.\d+){0,2}\s*"
    return all(re.fullmatch(specifier, part) or re.fullmatch(hyphen, part) for part in str(text).split(","))


def _compat_upper_major(text: str) -> float:
    """The largest major version a compat string admits (inf when unbounded)."""
    highest = 0.0
    for part in str(text).split(","):
        part = part.strip()
        if part.startswith((">=", "≥", ">")):
            return float("inf")
        numbers = re.findall(r"\d+(?:\.\d+){0,2}", part)
        if not numbers:
            continue
        major = int(numbers[-1].split(".")[0])
        if part.startswith(("<", "≤")):
            major = major - (1 if part.startswith("<") and numbers[-1].split(".")[1:] in ([], ["0"], ["0", "0"])
                             else 0)
        highest = max(highest, major)
    return highest


def check_project(project_path: Path, package_folder: Path | None = None) -> list[str]:
    """A package's Project.toml: name/uuid, UUIDs, [compat], [weakdeps]/[extensions] against ext/."""
    problems = []
    where = str(project_path)
    try:
        project = tomllib.loads(project_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        return [f"{where}: cannot be read as TOML ({error})"]
    if package_folder is not None:
        if not project.get("name"):
            problems.append(f"{where}: no package name")
        if not UUID.match(str(project.get("uuid", ""))):
            problems.append(f"{where}: package uuid {project.get('uuid')!r} is not a well-formed UUID")
        if not re.fullmatch(r"\d+\.\d+\.\d+", str(project.get("version", ""))):
            problems.append(f"{where}: version {project.get('version')!r} is not MAJOR.MINOR.PATCH")
    deps, weakdeps = project.get("deps", {}), project.get("weakdeps", {})
    extras, compat = project.get("extras", {}), project.get("compat", {})
    for section, table in (("deps", deps), ("weakdeps", weakdeps), ("extras", extras)):
        for name, uuid in table.items():
            if not UUID.match(str(uuid)):
                problems.append(f"{where}: [{section}] {name} = {uuid!r} is not a well-formed UUID")
            elif name in KNOWN_UUIDS and KNOWN_UUIDS[name] != uuid:
                problems.append(f"{where}: [{section}] {name} = {uuid!r}, but the registry's UUID of {name} is "
                                f"{KNOWN_UUIDS[name]}")
            elif name not in KNOWN_UUIDS and not (name == "Emu" and section == "deps"):
                problems.append(f"{where}: [{section}] {name}: unknown package; record its General-registry UUID in "
                                "tests/julia_structure.py (REGISTRY) after checking it there")
    for name in set(deps) & set(weakdeps):
        problems.append(f"{where}: {name} is in both [deps] and [weakdeps]")
    if "julia" not in compat:
        problems.append(f"{where}: [compat] has no julia entry")
    for name in list(deps) + list(weakdeps):
        if name in STDLIBS or name == "Emu":
            continue
        if name not in compat:
            problems.append(f"{where}: [compat] has no entry for {name}")
    for name, text in compat.items():
        if not _compat_ok(text):
            problems.append(f"{where}: [compat] {name} = {text!r} is not a valid compat specification")
        elif name not in deps and name not in weakdeps and name not in extras and name != "julia":
            problems.append(f"{where}: [compat] {name} names no dependency")
    if "CUDA" in compat and _compat_upper_major(compat["CUDA"]) >= 6:
        problems.append(f"{where}: [compat] CUDA = {compat['CUDA']!r} admits CUDA.jl 6, which renames its FFT module; "
                        "bound it below 6")
    for target, names in project.get("targets", {}).items():
        for name in names:
            if name not in deps and name not in extras and name not in weakdeps:
                problems.append(f"{where}: [targets] {target} names {name}, which is in neither [deps] nor [extras]")
    extensions = project.get("extensions", {})
    for extension, triggers in extensions.items():
        triggers = [triggers] if isinstance(triggers, str) else list(triggers)
        for trigger in triggers:
            if trigger not in weakdeps:
                problems.append(f"{where}: extension {extension} is triggered by {trigger}, which is not in [weakdeps]")
        if package_folder is not None:
            files = [package_folder / "ext" / f"{extension}.jl", package_folder / "ext" / extension / f"{extension}.jl"]
            if not any(f.is_file() for f in files):
                problems.append(f"{where}: extension {extension} has no file ext/{extension}.jl")
    used = {t for triggers in extensions.values() for t in ([triggers] if isinstance(triggers, str) else triggers)}
    for name in weakdeps:
        if name not in used:
            problems.append(f"{where}: weak dependency {name} triggers no extension")
    if package_folder is not None and (package_folder / "ext").is_dir():
        for path in sorted((package_folder / "ext").glob("*.jl")):
            if path.stem not in extensions:
                problems.append(f"{path}: no [extensions] entry names {path.stem}")
    return problems


def check_package(folder: Path) -> list[str]:
    """All checks of the Julia package in `folder` (Project.toml, src/, ext/, test/)."""
    project_path = folder / "Project.toml"
    problems = check_project(project_path, folder)
    try:
        project = tomllib.loads(project_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return problems
    name = project.get("name", "")
    deps, weakdeps = set(project.get("deps", {})), set(project.get("weakdeps", {}))
    entry = folder / "src" / f"{name}.jl"
    if not entry.is_file():
        return problems + [f"{folder}: no entry file src/{name}.jl"]
    [facts] = read_module_file(entry)
    problems += _gather(facts, "problems")
    if not any(module.name == name for module in all_modules(facts)):
        problems.append(f"{entry}: defines no `module {name}`")
    problems += check_unreached(facts, folder / "src")
    problems += check_imports(facts, deps, f"{project_path} [deps]")  # src/ never loads a weak dependency
    problems += check_exports(facts)
    extensions = project.get("extensions", {})
    for extension, triggers in extensions.items():
        triggers = {triggers} if isinstance(triggers, str) else set(triggers)
        candidates = [folder / "ext" / f"{extension}.jl", folder / "ext" / extension / f"{extension}.jl"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            continue
        [ext] = read_module_file(path)
        problems += _gather(ext, "problems")
        if not any(module.name == extension for module in all_modules(ext)):
            problems.append(f"{path}: defines no `module {extension}`")
        problems += check_imports(ext, deps | triggers, f"{project_path} [deps] or {extension}'s triggers",
                                  own={name})
        problems += check_exports(ext)
    test_entry = folder / "test" / "runtests.jl"
    if test_entry.is_file():
        [tests] = read_module_file(test_entry)
        problems += _gather(tests, "problems")
        test_targets = set(project.get("targets", {}).get("test", []))
        allowed = deps | (test_targets & set(project.get("extras", {}))) | (test_targets & weakdeps)
        test_project = folder / "test" / "Project.toml"
        if test_project.is_file():
            allowed |= set(tomllib.loads(test_project.read_text()).get("deps", {}))
        problems += check_imports(tests, allowed, f"{project_path} [deps] or [extras] + [targets].test", own={name},
                                  optional=set(project.get("extras", {})) | weakdeps)
    return problems


def check_scripts(paths: list[Path], environment: Path) -> list[str]:
    """Julia scripts run with --project=<repository root>: imports in that Project.toml or stdlibs."""
    problems = []
    try:
        env = tomllib.loads(environment.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        return [f"{environment}: cannot be read as TOML ({error})"]
    allowed = set(env.get("deps", {})) | set(STDLIBS)
    for path in paths:
        [facts] = read_module_file(path)
        problems += _gather(facts, "problems")
        problems += check_imports(facts, allowed, f"{environment} [deps] (or the standard library)")
    return problems


def check_environment(environment: Path, package_folder: Path) -> list[str]:
    """The development environment (top-level Project.toml) depends on the package by its UUID and
    points `[sources]` at its folder."""
    problems = []
    try:
        env = tomllib.loads(environment.read_text())
        package = tomllib.loads((package_folder / "Project.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        return [f"{environment}: cannot be read ({error})"]
    name, uuid = package.get("name"), package.get("uuid")
    if env.get("deps", {}).get(name) != uuid:
        problems.append(f"{environment}: [deps] {name} should be {uuid!r}, is {env.get('deps', {}).get(name)!r}")
    source = env.get("sources", {}).get(name, {})
    if (environment.parent / source.get("path", "<missing>")).resolve() != package_folder.resolve():
        problems.append(f"{environment}: [sources] {name} should point at {package_folder.name}/")
    problems += [p for p in check_project(environment) if "[compat] has no entry for Emu" not in p]
    return problems


def check_juliapkg(json_path: Path, package_folder: Path, *, julia_compat_of: Path | None = None) -> list[str]:
    """emu's juliapkg.json: valid JSON, julia compat, the local package by path (relative to the
    file) and UUID, dev = true, known UUIDs for anything else."""
    where = str(json_path)
    try:
        deps = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        return [f"{where}: cannot be read as JSON ({error})"]
    problems = []
    package = tomllib.loads((package_folder / "Project.toml").read_text())
    if not _compat_ok(deps.get("julia", "")):
        problems.append(f"{where}: \"julia\" compat {deps.get('julia')!r} is missing or invalid")
    elif julia_compat_of is not None:
        wanted = tomllib.loads(julia_compat_of.read_text()).get("compat", {}).get("julia")
        if wanted and str(wanted) != str(deps.get("julia")):
            problems.append(f"{where}: \"julia\" = {deps.get('julia')!r} differs from {julia_compat_of} "
                            f"[compat] julia = {wanted!r}")
    packages = deps.get("packages", {})
    entry = packages.get(package.get("name"))
    if entry is None:
        problems.append(f"{where}: does not declare the package {package.get('name')}")
    else:
        if entry.get("uuid") != package.get("uuid"):
            problems.append(f"{where}: {package.get('name')} uuid {entry.get('uuid')!r} differs from "
                            f"{package_folder / 'Project.toml'} ({package.get('uuid')!r})")
        target = (json_path.parent / str(entry.get("path", "<missing>"))).resolve()
        if target != package_folder.resolve():
            problems.append(f"{where}: {package.get('name')} path {entry.get('path')!r} resolves to {target}, "
                            f"not {package_folder.resolve()}")
        if entry.get("dev") is not True:
            problems.append(f"{where}: {package.get('name')} must be \"dev\": true (a local package)")
    for name, spec in packages.items():
        if name == package.get("name"):
            continue
        uuid = spec.get("uuid", "")
        if not UUID.match(uuid):
            problems.append(f"{where}: {name} uuid {uuid!r} is not a well-formed UUID")
        elif KNOWN_UUIDS.get(name, uuid) != uuid:
            problems.append(f"{where}: {name} uuid {uuid!r}, but the registry's is {KNOWN_UUIDS[name]}")
        if "version" in spec and not _compat_ok(spec["version"]):
            problems.append(f"{where}: {name} version {spec['version']!r} is not a valid compat specification")
    return problems
