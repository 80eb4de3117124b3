"""The Julia package's structure and the API the Python bridge calls, checked without Julia.

fatou's syntax tree of every .jl file in julia/ and scripts/ is walked by tests/julia_structure.py
(see there for the list of checks). The last tests feed deliberately broken packages and snippets
and assert each problem is reported, so these checks cannot pass vacuously.
"""

from __future__ import annotations

import ast
import os
import shutil
import textwrap
from pathlib import Path

import pytest

import julia_structure as js
from emu.julia import JULIA_CALLS, JULIA_MODULE

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "julia"
JULIAPKG_JSON = ROOT / "python" / "emu" / "juliapkg.json"


def _require_fatou() -> None:
    if shutil.which("fatou") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("fatou is not installed but CI=true: pip install -e \".[test]\" installs it")
        pytest.skip("fatou (pip install fatou, in the test extra) is not installed")


@pytest.fixture(scope="module")
def fatou():
    _require_fatou()


@pytest.fixture(scope="module")
def emu_module(fatou):
    [facts] = js.read_module_file(PACKAGE / "src" / f"{JULIA_MODULE}.jl")
    return facts


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


# -- the real tree ----------------------------------------------------------------------------------

def test_every_julia_file_parses(fatou):
    files = sorted(PACKAGE.rglob("*.jl")) + sorted((ROOT / "scripts").glob("*.jl"))
    assert files, "julia/ holds no .jl files"
    problems = js.check_parse(files)
    assert not problems, _report(problems)


def test_package_includes_imports_exports_and_project(fatou):
    problems = js.check_package(PACKAGE)
    assert not problems, _report(problems)


def test_every_function_the_bridge_calls_exists_with_its_arity(emu_module):
    problems = js.check_bridge_calls(emu_module, JULIA_CALLS, JULIA_MODULE)
    modules = [module for module in js.all_modules(emu_module) if module.name == JULIA_MODULE]
    exported = {name for name, _ in modules[0].exports} if modules else set()
    problems += [f"{JULIA_MODULE}.{name}: called by the Python bridge but not exported"
                 for name in sorted({name for name, _ in JULIA_CALLS} - exported)]
    assert not problems, _report(problems)


def test_scripts_use_only_the_development_environment(fatou):
    scripts = sorted((ROOT / "scripts").glob("*.jl"))
    if not scripts:
        pytest.skip("scripts/ holds no .jl files yet")
    problems = js.check_scripts(scripts, ROOT / "Project.toml")
    assert not problems, _report(problems)


def test_development_environment_and_juliapkg_json_point_at_the_package():
    problems = js.check_environment(ROOT / "Project.toml", PACKAGE)
    problems += js.check_juliapkg(JULIAPKG_JSON, PACKAGE, julia_compat_of=PACKAGE / "Project.toml")
    assert not problems, _report(problems)


def test_bridge_calls_are_the_table():
    """Every `call("name", ...)` in emu/julia.py is a (name, arity) of JULIA_CALLS, and every entry
    of the table is used: the table the Julia checks read is the bridge's own."""
    import emu.julia

    tree = ast.parse(Path(emu.julia.__file__).read_text())
    used = set()
    for node in ast.walk(tree):
        # call(name, *args) and _run_fused(name, out, *args) both pass every argument after the name.
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("call", "_run_fused")
                and node.args and isinstance(node.args[0], ast.Constant)):
            if any(isinstance(arg, ast.Starred) for arg in node.args[1:]):
                arities = {arity for name, arity in JULIA_CALLS if name == node.args[0].value}
                assert arities, f"call({node.args[0].value!r}, *...) at line {node.lineno} is not in JULIA_CALLS"
                used.update((node.args[0].value, arity) for arity in arities)
            else:
                pair = (node.args[0].value, len(node.args) - 1)
                assert pair in JULIA_CALLS, f"line {node.lineno}: call{pair} is not in JULIA_CALLS"
                used.add(pair)
    assert used == set(JULIA_CALLS), f"JULIA_CALLS entries never called: {sorted(set(JULIA_CALLS) - used)}"


def test_call_refuses_what_the_table_does_not_list():
    from emu.julia import call

    with pytest.raises(TypeError, match="JULIA_CALLS"):
        call("make_problem", "{}", 1, "float64")  # 3 arguments: not the arity the table lists
    with pytest.raises(TypeError, match="JULIA_CALLS"):
        call("run!", 1)


# -- the checker on broken input ------------------------------------------------------------------

def test_sexpr_reader_handles_strings_chars_and_nesting():
    tree = js.parse_sexpr(r'''(toplevel (= b (char '(')) (= c (char '\'')) (= d (string "a \"(\" b")) (call-post x '))''')
    [top] = tree
    assert top[0] == "toplevel"
    assert top[1] == ["=", "b", ["char", "'('"]]
    assert top[2] == ["=", "c", ["char", r"'\''"]]
    assert top[3][2] == ["string", 'a "(" b'] and isinstance(top[3][2][1], js.JuliaString)
    assert top[4] == ["call-post", "x", "'"]


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return folder


GOOD_PROJECT = """
    name = "Good"
    uuid = "11111111-2222-4333-8444-555555555555"
    version = "0.1.0"

    [deps]
    FFTW = "7a1cc6ca-52ef-59f5-83cd-3a7055c09341"
    LinearAlgebra = "37e2e46d-f89d-539d-b4ee-838fcccc9c8e"

    [weakdeps]
    CUDA = "052768ef-5323-5732-b1bb-66c8b64840ba"

    [extensions]
    GoodCUDAExt = "CUDA"

    [compat]
    CUDA = "5"
    FFTW = "1.8"
    julia = "1.10"

    [extras]
    CUDA = "052768ef-5323-5732-b1bb-66c8b64840ba"
    Test = "8dfed614-e22c-5e08-85e1-65c5234f0b40"

    [targets]
    test = ["CUDA", "Test"]
"""


def test_checker_passes_a_correct_package(fatou, tmp_path):
    folder = _write(tmp_path / "good", {
        "Project.toml": GOOD_PROJECT,
        "src/Good.jl": """
            module Good
            using FFTW: FFTW
            using LinearAlgebra: mul!
            export solve!, Problem, run!
            include("problem.jl")
            include(joinpath(@__DIR__, "steps.jl"))
            end
            """,
        "src/problem.jl": """
            struct Problem{T}
                x::T
            end
            """,
        "src/steps.jl": """
            function solve!(out, problem::Problem, steps::Integer = 1; verbose = false) where {T}
                return out
            end
            run!(problem, args...) = problem
            """,
        "ext/GoodCUDAExt.jl": """
            module GoodCUDAExt
            using CUDA: CuArray
            using Good: Good
            Good.solve!(out::CuArray, problem, steps) = out
            end
            """,
        "test/runtests.jl": """
            using Good
            using Test
            if Base.find_package("CUDA") !== nothing  # optional: a weak dependency, loaded where installed
                using CUDA
            end
            @test true
            """,
    })
    problems = js.check_package(folder)
    assert not problems, _report(problems)
    [facts] = js.read_module_file(folder / "src" / "Good.jl")
    calls = [("solve!", 2), ("solve!", 3), ("run!", 1), ("run!", 5)]
    assert js.check_bridge_calls(facts, calls, "Good") == []


def test_checker_reports_every_kind_of_breakage(fatou, tmp_path):
    project = (GOOD_PROJECT
               .replace('FFTW = "7a1cc6ca-52ef-59f5-83cd-3a7055c09341"', 'FFTW = "7a1cc6ca-52ef-59f5-83cd-3a7055c09342"')
               .replace('    FFTW = "1.8"\n', "")
               .replace('    CUDA = "5"\n', '    CUDA = ">= 5"\n')
               .replace('uuid = "11111111-2222-4333-8444-555555555555"', 'uuid = "not-a-uuid"')
               .replace('[weakdeps]\n    CUDA', '[weakdeps]\n    Adapt = "79e6a3ab-5dfb-504d-930d-738a2a938a0e"\n    CUDA')
               .replace('test = ["CUDA", "Test"]', 'test = ["Test"]'))
    folder = _write(tmp_path / "broken", {
        "Project.toml": project,
        "src/Good.jl": """
            module Good
            using FFTW: FFTW
            using JSON3: JSON3
            using CUDA: CuArray
            export solve!, missing_function
            include("missing.jl")
            include("steps.jl")
            end
            """,
        "src/steps.jl": """
            solve!(out, problem) = out
            needs_keyword(x; required_keyword) = x
            @kernel function fused_kernel!(out, a)
            end
            """,
        "src/orphan.jl": "f() = 1\n",
        "ext/GoodCUDAExt.jl": """
            module GoodCUDAExt
            using CUDA: CuArray
            using Adapt: adapt
            end
            """,
        "ext/StrayExt.jl": "module StrayExt\nend\n",
        "test/runtests.jl": """
            using Good
            using Test
            using BenchmarkTools
            if Base.find_package("Missing") !== nothing
                using Missing
            end
            if Base.find_package("CUDA") !== nothing  # in [extras] but not in the test target
                using CUDA
            end
            """,
    })
    problems = "\n".join(js.check_package(folder))
    expected = [
        "package uuid 'not-a-uuid' is not a well-formed UUID",
        "FFTW = '7a1cc6ca-52ef-59f5-83cd-3a7055c09342', but the registry's UUID of FFTW is",
        "[compat] has no entry for FFTW",
        "admits CUDA.jl 6",
        "weak dependency Adapt triggers no extension",
        "[compat] has no entry for Adapt",
        "StrayExt.jl: no [extensions] entry names StrayExt",
        "include target 'missing.jl' does not exist",
        "orphan.jl: never included from Good.jl",
        "`using`/`import` JSON3, which is not declared",
        "`using`/`import` CUDA, which is not declared",        # a weak dependency used in src/
        "`using`/`import` Adapt, which is not declared",       # in ext/, but not that extension's trigger
        "`using`/`import` BenchmarkTools, which is not declared",
        "exports `missing_function`, which it does not define",
        "`using`/`import` Missing (guarded by an `if`), which is not declared",
        "`using`/`import` CUDA (guarded by an `if`) is in [extras] or [weakdeps] but not in",
    ]
    missing = [text for text in expected if text not in problems]
    assert not missing, f"not reported: {missing}\n--- reported:\n{problems}"

    [facts] = js.read_module_file(folder / "src" / "Good.jl")
    calls = js.check_bridge_calls(facts, [("solve!", 3), ("absent!", 1), ("needs_keyword", 1), ("fused_kernel!", 2)],
                                  "Good")
    text = "\n".join(calls)
    assert "Good.solve!: the Python bridge calls it with 3 positional arguments; its methods take 2" in text
    assert "Good.absent!: the Python bridge calls it with 1 arguments but the package defines no such function" in text
    assert "Good.needs_keyword" in text and "required keywords required_keyword" in text
    assert "only as a @kernel" in text


def test_checker_reports_syntax_errors_and_unresolvable_includes(fatou, tmp_path):
    bad = tmp_path / "bad.jl"
    bad.write_text("function f(x =\n")
    assert js.check_parse([bad]), "a syntax error was not reported"
    dynamic = tmp_path / "dynamic.jl"
    dynamic.write_text('name = "x.jl"\ninclude(name)\n')
    [facts] = js.read_module_file(dynamic)
    assert any("not a literal path" in problem for problem in facts.problems)


def test_checker_reports_bad_juliapkg_json_and_environment(tmp_path):
    package = _write(tmp_path / "pkg", {"Project.toml": GOOD_PROJECT})
    json_path = tmp_path / "python" / "good" / "juliapkg.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text('{"julia": "1.9", "packages": {"Good": {"uuid": "11111111-2222-4333-8444-555555555556", '
                         '"path": "../../elsewhere"}, "FFTW": {"uuid": "7a1cc6ca-52ef-59f5-83cd-3a7055c09342"}}}')
    text = "\n".join(js.check_juliapkg(json_path, package, julia_compat_of=package / "Project.toml"))
    for expected in ('"julia" = \'1.9\' differs', "Good uuid", "path '../../elsewhere' resolves to",
                     'must be "dev": true', "FFTW uuid"):
        assert expected in text, f"{expected!r} not reported:\n{text}"
    environment = tmp_path / "Project.toml"
    environment.write_text('[deps]\nGood = "11111111-2222-4333-8444-555555555556"\n\n[compat]\njulia = "1.10"\n')
    text = "\n".join(js.check_environment(environment, package))
    assert "[deps] Good should be" in text and "[sources] Good should point at pkg/" in text


def test_cuda_version_the_bridge_installs_satisfies_the_package_compat():
    """`emu julia install --cuda` adds CUDA.jl at emu.julia.CUDA_PACKAGE's version: the same major
    version as the package's [compat] CUDA (when it has one), and the registry's UUID."""
    import tomllib

    from emu.julia import CUDA_PACKAGE

    assert CUDA_PACKAGE["uuid"] == js.REGISTRY["CUDA"]
    compat = tomllib.loads((PACKAGE / "Project.toml").read_text()).get("compat", {}).get("CUDA")
    if compat is None:
        pytest.skip("julia/Project.toml has no CUDA compat yet")
    majors = {part.strip().lstrip("^~=").split(".")[0] for part in str(compat).split(",")}
    assert CUDA_PACKAGE["version"].split(".")[0] in majors, (CUDA_PACKAGE, compat)
