"""The package layering of ``mta`` (README.rst, "Layout"): imports run downwards only.

Every module under ``mta/`` is parsed with :mod:`ast`; each import of one of
ours (at module level or inside a function, ``import x`` or ``from x import
y``, absolute or relative) is an edge from the importing module to the module
it names.  A module belongs to the unit (package or top-level module) of
:data:`LAYERS` that is the longest prefix of its name.  The rules:

* a unit may import only units of lower layers (and itself);
* units of the same layer are independent (neither imports the other);
* no circle of imports between modules, even inside one package;
* every module is in some unit, so a new package has to be placed here.

The layer order is written only here; README.rst draws the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

# Bottom to top.  A tuple holds the units of one layer, which are siblings.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mta.mail",),                    # vocabulary: addresses, replies, headers, readers, DSN fields
    ("mta.defaults",),                # the embedded demo configuration (text only)
    ("mta.config",),                  # the one typed configuration
    ("mta.system",),                  # OS and network helpers: files, fsync, epoll, DNS, TLS, PROXY
    ("mta.queue",),                   # the queue, its runner and the interfaces it calls
    ("mta.policy", "mta.delivery"),   # decisions on mail / couriers that carry it out
    ("mta.intake",),                  # taking a message in without SMTP (local submission)
    ("mta.smtp",),                    # the SMTP server session
    ("mta.daemon",),                  # wiring the running daemon: service, workers, control, logs
    ("mta.admin",),                   # the commands: mta, sendmail, mailq, the control client
)

ROOT = Path(__file__).resolve().parent.parent / "mta"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that module ``name`` (file ``path``) imports, anywhere in it."""
    top = name.split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from mta.policy import dkim" names the module mta.policy.dkim.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target == top or target.startswith(top + "."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                found.add(target)
    found.discard(name)
    return found


def unit_of(name: str, units: list[str]) -> str | None:
    matches = [u for u in units if name == u or name.startswith(u + ".")]
    return max(matches, key=len) if matches else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def check(root: Path, layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """Every breach of the layering of the package at ``root``, one line each."""
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    units = list(level)
    known = module_names(root)
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    problems = []
    for name in sorted(known):
        unit = unit_of(name, units)
        if unit is None:
            if name != root.name:
                problems.append(f"{name} is in no layer: place it in LAYERS and README.rst")
            continue
        for target in sorted(graph[name]):
            other = unit_of(target, units)
            if other is None or other == unit:
                continue
            if level[other] > level[unit]:
                problems.append(f"{name} imports {target}: {other} is above {unit}")
            elif level[other] == level[unit]:
                problems.append(f"{name} imports {target}: {other} and {unit} are siblings")
    for component in circles(graph):
        problems.append("import circle: " + " <-> ".join(component))
    return problems


def test_mta_imports_run_downwards_only():
    assert check(ROOT, LAYERS) == []


def test_every_layer_names_an_existing_package_or_module():
    known = module_names(ROOT)
    assert [unit for layer in LAYERS for unit in layer if unit not in known] == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "mta"


SMALL = (("mta.mail",), ("mta.queue", "mta.policy"), ("mta.smtp",))


def test_check_reports_an_upward_import_also_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "mta/__init__.py": "", "mta/mail/__init__.py": "", "mta/smtp/__init__.py": "",
        "mta/queue/__init__.py": "", "mta/policy/__init__.py": "",
        "mta/smtp/server.py": "from mta.mail.address import parse\n",
        "mta/mail/address.py": "def parse():\n    from mta.smtp import server\n",
    })
    assert check(root, SMALL) == [
        "mta.mail.address imports mta.smtp.server: mta.smtp is above mta.mail",
        "import circle: mta.mail.address <-> mta.smtp.server",
    ]


def test_check_reports_siblings_relative_imports_circles_and_unplaced_modules(tmp_path):
    root = _tree(tmp_path, {
        "mta/__init__.py": "", "mta/mail/__init__.py": "", "mta/smtp/__init__.py": "",
        "mta/queue/__init__.py": "", "mta/policy/__init__.py": "",
        "mta/policy/srs.py": "import mta.queue.envelope\n",
        "mta/queue/envelope.py": "",
        "mta/queue/store.py": "from . import runner\n",
        "mta/queue/runner.py": "from mta.queue import store\n",
        "mta/stray.py": "",
    })
    assert check(root, SMALL) == [
        "mta.policy.srs imports mta.queue.envelope: mta.queue and mta.policy are siblings",
        "mta.stray is in no layer: place it in LAYERS and README.rst",
        "import circle: mta.queue.runner <-> mta.queue.store",
    ]
