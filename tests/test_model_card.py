"""The model card's Architecture section against the repository: its layout tree names exactly the files of
bundle/scripts, bundle/configs, bundle/docs, tests and tools (no file left out, none that is gone), and its
data-flow diagram is a valid SVG that names both methods and only files and classes that exist."""

from __future__ import annotations

import glob
import os
import re
import xml.etree.ElementTree as ElementTree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CARD = os.path.join(REPO_ROOT, "bundle", "docs", "README.md")
DIAGRAM = os.path.join(REPO_ROOT, "bundle", "docs", "architecture.svg")
#: Folders whose every file the tree names (recursively; __pycache__ aside).
EXACT_FOLDERS = ("bundle/scripts", "bundle/configs", "bundle/docs", "tools")
TREE_PREFIX = set("│├└─ ")
SVG = "http://www.w3.org/2000/svg"
#: MONAI Label's own classes the diagram names (the stock app's tasks that read the bundle's configs).
MONAI_LABEL_TASKS = {"BundleInferTask", "BundleTrainTask"}


def architecture_section() -> str:
    with open(MODEL_CARD) as handle:
        card = handle.read()
    start = card.index("\n## Architecture\n")
    end = card.index("\n## ", start + 1)
    return card[start:end]


def tree_paths(section: str) -> set[str]:
    """The paths the layout tree names: each line is `<prefix><name>[, <name>...]  <what>` with four
    characters of prefix per level; a name ending in `/` is a folder; a line without a name continues the
    description above it."""
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    paths, folders = set(), []
    for line in block.splitlines():
        width = 0
        while width < len(line) and line[width] in TREE_PREFIX:
            width += 1
        if width and "─" not in line[:width]:
            continue  # no branch: the description of the line above goes on
        names = re.split(r"\s{2,}", line[width:], maxsplit=1)[0]
        assert width % 4 == 0, f"tree line not on a 4-character level: {line!r}"
        depth = width // 4
        del folders[depth:]
        for name in names.split(", "):
            path = "/".join(folders + [name.rstrip("/")])
            paths.add(path)
            if name.endswith("/"):
                folders.append(name.rstrip("/"))
    return paths


def files_under(folder: str) -> set[str]:
    found = set()
    for root, dirs, files in os.walk(os.path.join(REPO_ROOT, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {os.path.relpath(os.path.join(root, f), REPO_ROOT) for f in files if not f.endswith(".pyc")}
    return found


def test_layout_tree_names_every_file_and_no_other():
    listed = tree_paths(architecture_section())
    gone = sorted(p for p in listed if not os.path.exists(os.path.join(REPO_ROOT, p)))
    assert not gone, f"the model card's layout names files that do not exist: {gone}"
    for folder in EXACT_FOLDERS:
        on_disk = files_under(folder)
        named = {p for p in listed if p.startswith(folder + "/") and os.path.isfile(os.path.join(REPO_ROOT, p))}
        assert on_disk - named == set(), f"not in the model card's layout: {sorted(on_disk - named)}"
    tests = {os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "tests", "*.py"))}
    assert tests - listed == set(), f"test files not in the model card's layout: {sorted(tests - listed)}"
    app = {
        os.path.relpath(p, REPO_ROOT)
        for p in glob.glob(os.path.join(REPO_ROOT, "monailabel_app", "*"))
        if not p.endswith(".md")
    }
    assert app - listed == set(), f"monailabel_app entries not in the model card's layout: {sorted(app - listed)}"


def test_layout_tree_parser_reads_levels_and_lists():
    """The parser the layout test relies on: levels by prefix, folders, comma lists, continuation lines."""
    section = (
        "```text\n"
        "top/                 a room\n"
        "├── a.py             one\n"
        "├── sub/\n"
        "│   └── b.py, c.py\n"
        "│                     the two\n"
        "└── d.yaml           last\n"
        "other/\n"
        "```\n"
    )
    assert tree_paths(section) == {"top", "top/a.py", "top/sub", "top/sub/b.py", "top/sub/c.py", "top/d.yaml", "other"}


def test_diagram_is_valid_svg_naming_both_methods_and_real_parts():
    root = ElementTree.parse(DIAGRAM).getroot()
    assert root.tag == f"{{{SVG}}}svg"
    text = " ".join(
        "".join(element.itertext()) for tag in ("title", "desc", "text") for element in root.iter(f"{{{SVG}}}{tag}")
    )
    assert "SurgicalSAM" in text and "Distillation-SAM" in text
    for stage in (
        "Preparation",
        "dataset.json",
        "Embedding cache",
        "Tap cache",
        "Training",
        "Evaluation",
        "Inference",
        "MONAI Label",
        "ONNX",
    ):
        assert stage in text, stage
    # every file it names exists, and every class name is one the code defines
    names = set(re.findall(r"[\w*]+\.(?:py|yaml)\b", text))
    sources = glob.glob(os.path.join(REPO_ROOT, "bundle", "**", "*"), recursive=True)
    sources += glob.glob(os.path.join(REPO_ROOT, "monailabel_app", "**", "*"), recursive=True)
    basenames = {os.path.basename(p) for p in sources}
    for name in names:
        assert any(re.fullmatch(re.escape(name).replace(r"\*", ".*"), b) for b in basenames), name
    code = "".join(
        open(p).read() for p in glob.glob(os.path.join(REPO_ROOT, "bundle", "scripts", "**", "*.py"), recursive=True)
    )
    classes = set(re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+\b", text)) - {"SurgicalSAM"} - MONAI_LABEL_TASKS
    assert classes, "the diagram names no class"
    glue = "".join(
        open(p).read()
        for p in glob.glob(os.path.join(REPO_ROOT, "bundle", "scripts", "*.py"))
        + glob.glob(os.path.join(REPO_ROOT, "monailabel_app", "lib", "*.py"))
    )
    assert all(task in glue for task in MONAI_LABEL_TASKS)  # the tasks the bundle's MONAI Label glue serves
    undefined = sorted(c for c in classes if not re.search(rf"^class {c}\b", code, re.MULTILINE))
    assert not undefined, f"the diagram names classes the code does not define: {undefined}"


def test_model_card_shows_the_diagram():
    section = architecture_section()
    assert re.search(r"!\[[^\]]+\]\(architecture\.svg\)", section)


def test_docs_give_the_newcomers_commands():
    card = open(os.path.join(REPO_ROOT, "bundle", "docs", "README.md"), encoding="utf-8").read()
    table = card[card.index("## Commands") : card.index("### Dataset overlays")]
    assert (
        "`python -m monai.bundle run --config_file \"['bundle/configs/inference.yaml',"
        "'bundle/configs/demo_inference.yaml']\" --dataset_dir FRAMES`"
    ) in table
    own = card[card.index("**Your own data**") : card.index("**Cross-dataset**")]
    for command in (
        "surgical-sam prepare_custom --config raw/classes.yaml --out_dir data/mine",
        "run precompute --config_file bundle/configs/train.yaml --dataset_dir data/mine",
        "run training   --config_file bundle/configs/train.yaml --dataset_dir data/mine",
        "run evaluating",
        "--class_names \"['Grasper','Hook']\"",
        '--frame_size "[480, 640]"',
    ):
        assert command in own, command
    for key in ("frames_dir: frames", "labels_dir: labels", "classes: {1: Grasper, 2: Hook}"):
        assert key in own
