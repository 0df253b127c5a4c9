"""Imports run downward: the rooms of bundle/scripts never import the glue above them.

Read from the source with ``ast`` (every import, also those inside functions), so nothing is imported to
check it. Rooms, low to high: files.py, errors.py and the shared SAM core (sam/); the methods' networks
(surgical_sam/, distillation_sam/); data/; evaluation/; the methods' engine parts (losses, inferers,
batches, datasets); above them the engine glue (engine/), the MONAI Label glue (monailabel_glue/), deployment
(deploy/), the benchmark and the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"

#: Engine glue, MONAI Label glue, deployment, the CLI and the commands built on them.
GLUE = ("scripts.engine", "scripts.monailabel_glue", "scripts.deploy", "scripts.cli", "scripts.benchmark")
#: The shared SAM core: what data/ and the methods build on.
SAM_CORE = ("scripts.sam",)
METHODS = ("scripts.surgical_sam", "scripts.distillation_sam")
#: The methods' networks: tensors and modules only.
NETWORKS = (
    "scripts.surgical_sam.network",
    "scripts.surgical_sam.prototype_prompt_encoder",
    "scripts.surgical_sam.original_checkpoint",
    "scripts.surgical_sam.label_map_network",
    "scripts.surgical_sam.onnx_parts",
    "scripts.distillation_sam.network",
    "scripts.distillation_sam.adapter",
    "scripts.distillation_sam.pvt",
    "scripts.distillation_sam.teacher_prompts",
)
LOWER_ROOMS = SAM_CORE + NETWORKS + ("scripts.data", "scripts.evaluation", "scripts.files", "scripts.errors")


def _inside(module: str, rooms) -> bool:
    return any(module == room or module.startswith(room + ".") for room in rooms)


def module_imports() -> dict[str, set[str]]:
    """{module: the scripts.* modules it imports}, relative imports resolved, for every module of scripts/."""
    found = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(SCRIPTS.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                    # "from . import x" imports the submodule x
                    imported |= {f"{name}.{alias.name}" for alias in node.names} if node.module is None else {name}
                else:
                    imported.add(node.module or "")
        found[module] = {name for name in imported if _inside(name, ("scripts",))}
    return found


IMPORTS = module_imports()


def test_the_walker_sees_imports_at_the_top_and_inside_functions():
    assert "scripts.sam.backbone" in IMPORTS["scripts.data.embedding_cache"]  # top of the module
    assert "scripts.data.layout" in IMPORTS["scripts.distillation_sam.checks"]  # inside check_distill_inputs
    assert len(IMPORTS) > 40


def test_every_module_lives_in_a_room():
    """Nothing of scripts/ sits outside the rooms this test knows (a new top-level module gets a room here)."""
    known = GLUE + SAM_CORE + METHODS + ("scripts.data", "scripts.evaluation", "scripts.files", "scripts.errors")
    stray = sorted(m for m in IMPORTS if m != "scripts" and not _inside(m, known))
    assert not stray, f"{stray} belong to no room: move them into one, or name their room in this test"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, LOWER_ROOMS)))
def test_lower_rooms_never_import_the_glue(module):
    upward = sorted(name for name in IMPORTS[module] if _inside(name, GLUE))
    assert not upward, f"{module} imports {upward}: move what it needs down, into the room it belongs to"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, SAM_CORE)))
def test_the_sam_core_imports_only_itself(module):
    others = sorted(name for name in IMPORTS[module] if not _inside(name, SAM_CORE + ("scripts.files",)))
    assert not others, f"{module} imports {others}: the SAM core is what the rest builds on"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, NETWORKS)))
def test_networks_import_only_networks(module):
    others = sorted(
        name for name in IMPORTS[module] if not _inside(name, NETWORKS + SAM_CORE + ("scripts.files", "scripts.errors"))
    )
    assert not others, f"{module} imports {others}: networks take tensors and modules, not data or evaluation"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, METHODS)))
def test_a_method_never_imports_the_other(module):
    own = next(method for method in METHODS if _inside(module, (method,)))
    other = sorted(name for name in IMPORTS[module] if _inside(name, METHODS) and not _inside(name, (own,)))
    assert not other, f"{module} imports {other}: what both methods share belongs in the SAM core, data/ or evaluation/"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, ("scripts.evaluation",))))
def test_evaluation_takes_label_maps_not_methods(module):
    methods = sorted(name for name in IMPORTS[module] if _inside(name, METHODS))
    assert not methods, f"{module} imports {methods}: evaluation scores label maps, whichever method made them"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _inside(m, ("scripts.data",))))
def test_data_takes_only_the_shared_sam_core_no_preparation_and_no_demo(module):
    methods = sorted(name for name in IMPORTS[module] if _inside(name, METHODS))
    assert not methods, f"{module} imports a method's module {methods}"
    if not _inside(module, ("scripts.data.prepare",)):
        preparation = sorted(name for name in IMPORTS[module] if _inside(name, ("scripts.data.prepare",)))
        assert not preparation, (
            f"{module} imports {preparation}: dataset facts are in scripts.data.datasets, "
            "preparations only write datasets"
        )
    # (the demo's new-site video is the demo's own: it draws with the demo's generator, issue 25)
    assert "scripts.data.demo" not in IMPORTS[module] or module == "scripts.data.demo_new_site", (
        f"{module} imports the demo generator: what it shares (e.g. scripts.data.overlay) has a module of its own"
    )


def test_no_private_name_is_imported_from_another_module():
    """A name that starts with "_" is its module's own: another module that needs it gets a public one."""
    repo = SCRIPTS.parents[1]
    private = []
    for folder in (SCRIPTS, repo / "monailabel_app", repo / "tools"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("scripts")):
                    private += [
                        f"{path.relative_to(repo)}:{node.lineno} {alias.name}"
                        for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")
                    ]
    assert not private, private
