"""The docs against the repository. The model card's layout tree names exactly the files of bundle/scripts,
bundle/configs, bundle/docs, tests and tools (no file left out, none that is gone); its data-flow diagram is a
valid SVG that names both methods and only files and classes that exist; the README and the card stay within
their word budgets; every relative link of the docs resolves; and every command the docs show names configs,
run ids, options and ``surgical-sam`` commands that exist."""

from __future__ import annotations

import glob
import inspect
import os
import re
import xml.etree.ElementTree as ElementTree

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
MODEL_CARD = os.path.join(REPO_ROOT, "bundle", "docs", "README.md")
CONTRIBUTING = os.path.join(REPO_ROOT, "CONTRIBUTING.md")
DOC_PAGES = (
    "README.md",
    "CONTRIBUTING.md",
    "bundle/docs/README.md",
    "bundle/docs/fidelity.md",
    "bundle/docs/workflows.md",
    "bundle/docs/distillation_sam.md",
    "monailabel_app/README.md",
)
#: Word budgets (as ``wc -w`` counts): a researcher reads the README in five minutes; the card is a
#: model-zoo card plus the layout tree.
README_MAX_WORDS = 900
MODEL_CARD_MAX_WORDS = 3000
DIAGRAM = os.path.join(REPO_ROOT, "bundle", "docs", "architecture.svg")
#: Folders whose every file the tree names (recursively; __pycache__ aside).
EXACT_FOLDERS = ("bundle/scripts", "bundle/configs", "bundle/docs", "tools")
TREE_PREFIX = set("│├└─ ")
SVG = "http://www.w3.org/2000/svg"
#: MONAI Label's own classes the diagram names (the stock app's tasks that read the bundle's configs).
MONAI_LABEL_TASKS = {"BundleInferTask", "BundleTrainTask"}


def read(path: str) -> str:
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def architecture_section() -> str:
    card = read(MODEL_CARD)
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
    """The model card's tree names the bundle's files and the app's parts; CONTRIBUTING.md's, tools/ and tests/."""
    listed = tree_paths(architecture_section()) | tree_paths(read(CONTRIBUTING))
    gone = sorted(p for p in listed if not os.path.exists(os.path.join(REPO_ROOT, p)))
    assert not gone, f"the layout trees name files that do not exist: {gone}"
    for folder in EXACT_FOLDERS:
        on_disk = files_under(folder)
        named = {p for p in listed if p.startswith(folder + "/") and os.path.isfile(os.path.join(REPO_ROOT, p))}
        assert on_disk - named == set(), f"not in the layout trees: {sorted(on_disk - named)}"
    tests = {os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "tests", "*.py"))}
    assert tests - listed == set(), f"test files not in CONTRIBUTING.md's layout: {sorted(tests - listed)}"
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


def test_model_card_and_readme_show_the_diagram():
    assert re.search(r"!\[[^\]]+\]\(architecture\.svg\)", read(MODEL_CARD))
    assert re.search(r"!\[[^\]]+\]\(bundle/docs/architecture\.svg\)", read(README))


# ------------------------------------------------------------------------------------------ the docs' shape
def word_count(text: str) -> int:
    """Words as ``wc -w`` counts them: runs of characters between whitespace."""
    return len(text.split())


def test_readme_fits_its_word_budget():
    words = word_count(read(README))
    assert words <= README_MAX_WORDS, f"README.md has {words} words (budget {README_MAX_WORDS}): move detail out"


def test_model_card_fits_its_word_budget():
    words = word_count(read(MODEL_CARD))
    assert words <= MODEL_CARD_MAX_WORDS, (
        f"bundle/docs/README.md has {words} words (budget {MODEL_CARD_MAX_WORDS}): detail goes to workflows.md, "
        "fidelity.md or performance.md"
    )


def test_word_count_counts_as_wc_does():
    assert word_count("a  b\tc\nd ├── e.py   x-y") == 7


def relative_links(markdown: str) -> list[str]:
    """Targets of the ``[text](target)`` links that point into the repository (no scheme, not a bare anchor),
    without their ``#anchor``; code spans and fenced blocks are not links."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_reader_skips_urls_anchors_and_code():
    text = "[a](x.md) [b](https://e.org) [c](#top) [d](../y.md#part) `[e](z.md)` ![f](g.svg)\n```\n[h](i.md)\n```"
    assert relative_links(text) == ["x.md", "../y.md", "g.svg"]


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page in DOC_PAGES:
        folder = os.path.dirname(os.path.join(REPO_ROOT, page))
        for target in relative_links(read(page)):
            if not os.path.exists(os.path.normpath(os.path.join(folder, target))):
                broken.append(f"{page}: {target}")
    assert not broken, f"links to nothing: {broken}"


# ------------------------------------------------------------------------------------- the docs' commands
#: Pages whose commands are checked: the card, its manuals and the README.
COMMAND_PAGES = ("README.md", "bundle/docs/README.md", "bundle/docs/workflows.md", "bundle/docs/distillation_sam.md")
#: Options of ``python -m monai.bundle`` itself, not config ids.
BUNDLE_OPTIONS = {"config_file", "meta_file", "bundle_path", "bundle_dir", "logging_file", "args_file"}


def shell_commands(markdown: str) -> list[str]:
    """Every command line the page shows, in code spans and fenced blocks; a command written over several
    lines (a trailing backslash, or a quoted list left open) is joined into one."""
    commands = [span for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))]
    for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S):
        pending = ""
        for line in block.splitlines():
            line = line.split(" # ", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            pending = f"{pending} {line.strip()}" if pending else line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1].rstrip()
                continue
            if pending.count('"') % 2:
                continue
            if pending:
                commands.append(pending)
            pending = ""
    return [c for c in commands if c.startswith(("python -m monai.bundle", "surgical-sam ", "torchrun "))]


def config_keys(config_files: list[str]) -> set[str]:
    """Top-level ids of the given configs, merged (paths relative to the repository or to bundle/)."""
    keys = set()
    for name in config_files:
        path = os.path.join(REPO_ROOT, name) if name.startswith("bundle/") else os.path.join(REPO_ROOT, "bundle", name)
        with open(path) as handle:
            keys |= set(yaml.safe_load(handle) or {})
    return keys


def command_problems(command: str) -> list[str]:
    """What in one shown command does not exist: a config file, a run id, an option or a CLI command."""
    problems = []
    configs = re.findall(r"(?:bundle/)?configs/[\w.]+\.(?:yaml|json)", command)
    for name in configs:
        path = os.path.join(REPO_ROOT, name) if name.startswith("bundle/") else os.path.join(REPO_ROOT, "bundle", name)
        if not os.path.isfile(path):
            problems.append(f"no config {name}")
    # the options of the bundle's own command (torchrun's come before ``-m monai.bundle``)
    own_part = command.split(" -m monai.bundle ", 1)[-1]
    options = set(re.findall(r"(?:^|\s)--(\w+)", own_part))
    if command.startswith("surgical-sam "):
        from scripts.cli import COMMANDS

        name = command.split()[1]
        if name not in COMMANDS:
            return [f"no surgical-sam command {name!r}"]
        parameters = set(inspect.signature(COMMANDS[name]).parameters)
        problems += [f"surgical-sam {name} has no --{o}" for o in sorted(options - parameters - {"help"})]
        return problems
    match = re.search(r"monai\.bundle (\w+)(?: (\w+))?", command)
    if match and match[1] == "run" and not problems:
        yaml_configs = [c for c in configs if c.endswith(".yaml")]
        if yaml_configs:  # (a placeholder list such as C is explained beside the command, not checked)
            keys = config_keys(yaml_configs)
            run_id = match[2] or "run"
            if run_id not in keys:
                problems.append(f"no run id {run_id!r} in {yaml_configs}")
            problems += [f"no id {o!r} in {yaml_configs}" for o in sorted(options - keys - BUNDLE_OPTIONS)]
    return problems


def test_command_checker_finds_what_does_not_exist():
    assert command_problems("surgical-sam demo") == []
    assert command_problems("surgical-sam no_such_command") == ["no surgical-sam command 'no_such_command'"]
    assert command_problems("surgical-sam pack --out_dir d --no_such_option 1") == [
        "surgical-sam pack has no --no_such_option"
    ]
    assert command_problems("python -m monai.bundle run --config_file bundle/configs/nothing.yaml") == [
        "no config bundle/configs/nothing.yaml"
    ]
    assert command_problems("python -m monai.bundle run nowhere --config_file bundle/configs/train.yaml") == [
        "no run id 'nowhere' in ['bundle/configs/train.yaml']"
    ]
    assert command_problems("python -m monai.bundle run --config_file bundle/configs/train.yaml --no_such_id 1") == [
        "no id 'no_such_id' in ['bundle/configs/train.yaml']"
    ]
    assert (
        command_problems("torchrun --nproc_per_node 2 -m monai.bundle run --config_file bundle/configs/train.yaml")
        == []
    )
    block = "```\npython -m monai.bundle run training \\\n    --config_file \"['a',\n    'b']\" --x 1\n```"
    assert shell_commands(block) == ["python -m monai.bundle run training --config_file \"['a', 'b']\" --x 1"]


def test_every_command_of_the_docs_names_what_exists():
    problems = []
    for page in COMMAND_PAGES:
        commands = shell_commands(read(page))
        assert commands, f"{page} shows no command"
        problems += [f"{page}: {p} in: {c}" for c in commands for p in command_problems(c)]
    assert not problems, "\n".join(problems)


def test_docs_give_the_newcomers_commands():
    """The card shows inference with the demo model; the workflows manual, the own-data path end to end."""
    card = read(MODEL_CARD)
    table = card[card.index("## Commands") : card.index("## Limits")]
    assert (
        "`python -m monai.bundle run --config_file \"['bundle/configs/inference.yaml',"
        "'bundle/configs/demo_inference.yaml']\" --dataset_dir FRAMES`"
    ) in table
    manual = read("bundle/docs/workflows.md")
    own = manual[manual.index("**Your own data**") : manual.index("**Cross-dataset**")]
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
