"""Every command the documentation shows is checked without running anything.

The documentation is README.md, docs/**/*.md and the files the docs include with ``--8<--``
(slurm/README.md, bench/README.md). From their fenced code blocks and inline code spans:

- every ``python train.py ...`` / ``python eval.py ...`` (also through ``torchrun`` and the ``slurm/*.sbatch``
  templates, whose arguments go to ``train.py`` / ``eval.py``) is composed by Hydra's compose API against
  ``conf/`` with its overrides: a config name, option or key that does not exist fails. Placeholders
  (``<ckpt>``, ``$SLURM_ARRAY_TASK_ID``, a lone ``...``) get dummies; a multirun (``-m``) is composed with the
  first value of every swept list; ``SWEEP=<file>`` of ``slurm/array.sbatch`` composes every line of the file;
- every ``python -m fusion.<module>`` is a module of this repository that runs as a script
  (a package with ``__main__.py``, or a module with ``if __name__ == "__main__"``);
- every path below ``bench/``, ``slurm/``, ``tests/``, ``conf/``, ``fusion/`` or ``docs/`` that a command names
  exists.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

import fusion

ROOT = Path(__file__).resolve().parents[1]
# Paths a command may name that must exist in the repository.
REPO_DIRS = ("bench/", "slurm/", "tests/", "conf/", "fusion/", "docs/")
# Code blocks in these languages hold data, not commands.
DATA_LANGS = {"json", "yaml", "yml", "python", "py", "text", "csv"}
SBATCH_SCRIPTS = {"slurm/train.sbatch": "train", "slurm/array.sbatch": "train", "slurm/eval.sbatch": "eval"}


@dataclass
class Command:
    """One command line as the docs show it: where, the shell words, and what to check."""

    where: str
    line: str
    words: list[str]
    config: str | None = None  # "train" / "eval": compose with these overrides
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    module: str | None = None  # python -m <module>
    paths: list[str] = field(default_factory=list)  # repository paths named
    env: dict[str, str] = field(default_factory=dict)


# ---- reading the docs -----------------------------------------------------------------------------
def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/**/*.md and every file a docs page includes with ``--8<-- "<path>"``."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    included = []
    for f in files:
        for path in re.findall(r'^-+8<-+\s+"([^":]+)[^"]*"', f.read_text(), re.M):
            assert (root / path).is_file(), f"{f.relative_to(root)} includes {path}, which does not exist"
            included.append(root / path)
    return files + sorted(set(included) - set(files))


FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.S | re.M
)


# A line that runs something: optional VAR=value words, then a program.
COMMAND_START = re.compile(
    r"([A-Z_][A-Z0-9_]*=\S*\s+)*(python3?|torchrun|sbatch|srun|pytest|nice|make|\S*/bin/\S+)(\s|$)"
)


def command_lines(text: str) -> list[str]:
    """The command lines of a Markdown text: lines of shell code blocks (continuations joined, ``$ `` prompts
    dropped) and inline code spans that start a command."""
    lines: list[str] = []
    for m in FENCE.finditer(text):
        lang = m["lang"].strip().split(" ")[0].lower()
        if lang in DATA_LANGS:
            continue
        body = re.sub(r"\\\n", " ", m["body"])
        pending = ""  # a quoted argument may span lines (python -c '...')
        for raw in body.splitlines():
            line = raw.strip()
            if not pending:
                if line.startswith("$ "):
                    line = line[2:]
                if not COMMAND_START.match(line):
                    continue  # output, a diagram, a file tree
            line = f"{pending}\n{line}" if pending else line
            try:
                shlex.split(line, comments=True)
            except ValueError:
                pending = line
                continue
            pending = ""
            lines.append(line)
        if pending:
            lines.append(pending)  # parse() names the unbalanced quote
    prose = FENCE.sub("", text)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(span.split())
        if COMMAND_START.match(span):
            lines.append(span)
    return lines


def _placeholder(word: str) -> str:
    """A dummy for the placeholders of a shown command: ``<...>`` and shell variables."""
    word = re.sub(r"<[^<>]*>", "x", word)
    return re.sub(r"\$\{?[A-Z_][A-Z0-9_]*\}?", "0", word)


def parse(line: str, where: str = "?") -> Command | None:
    """The command of one shown line, or None if it runs none of the project's entry points or scripts."""
    try:
        words = shlex.split(_placeholder(line), comments=True)
    except ValueError as e:  # an unbalanced quote in a shown command is a docs bug
        raise AssertionError(f"{where}: cannot split {line!r}: {e}") from e
    if not words:
        return None
    cmd = Command(where, line, words)
    cmd.paths = [w.split("=", 1)[-1] for w in words
                 if w.split("=", 1)[-1].startswith(REPO_DIRS) and "*" not in w]
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[i]):  # env assignments
        key, value = words[i].split("=", 1)
        cmd.env[key] = value
        i += 1
    while i < len(words) and words[i] in ("nice", "time", "-n", "10", "srun"):
        i += 1
    rest = words[i:]
    if not rest:
        return cmd if cmd.paths else None
    head = rest[0]
    args: list[str] | None = None
    if head in ("python", "python3") or head.endswith("/python"):
        if rest[1:2] == ["-m"] and len(rest) > 2:
            cmd.module = rest[2]
        elif len(rest) > 1 and rest[1] in ("train.py", "eval.py"):
            cmd.config, args = rest[1].removesuffix(".py"), rest[2:]
    elif head == "torchrun":
        script = next((w for w in rest if w in ("train.py", "eval.py")), None)
        if script is not None:
            cmd.config, args = script.removesuffix(".py"), rest[rest.index(script) + 1:]
    elif head == "sbatch":
        script = next((w for w in rest if w in SBATCH_SCRIPTS), None)
        if script is not None:
            cmd.config, args = SBATCH_SCRIPTS[script], rest[rest.index(script) + 1:]
    if args is not None:
        for arg in args:
            if arg in ("-m", "--multirun"):
                cmd.multirun = True
            elif arg == "..." or arg.startswith("-"):
                continue  # "...": the rest of a command shown above
            else:
                cmd.overrides.append(arg)
    if cmd.config or cmd.module or cmd.paths:
        return cmd
    return None


def commands(root: Path = ROOT) -> list[Command]:
    """Every command the documentation shows."""
    found = []
    for f in doc_files(root):
        for line in command_lines(f.read_text()):
            cmd = parse(line, str(f.relative_to(root)))
            if cmd is not None:
                found.append(cmd)
    return found


# ---- checking them --------------------------------------------------------------------------------
def first_of_sweeps(overrides: list[str], root: Path = ROOT) -> list[str]:
    """A multirun's overrides with every swept list replaced by its first value.

    The other values of a swept config group (``fusion=a,b``, ``encoder=[a],[b,c]``, ``+experiment=a,b``) are
    checked to be options of the group (``conf/<group>/<option>.yaml``), without composing each.
    """
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            group = root / "conf" / o.key_or_group
            if group.is_dir():
                for value in values:
                    for option in value.strip("[]").split(","):
                        option = option.strip()
                        assert (group / f"{option}.yaml").is_file(), (
                            f"{o.key_or_group}={value}: conf/{o.key_or_group}/{option}.yaml does not exist")
            out.append(f"{o.get_key_element()}={values[0]}")
        else:
            out.append(o.input_line)
    return out


def compose_command(cmd: Command) -> list:
    """Compose the config(s) of a train/eval command (call inside ``initialize_config_dir``)."""
    runs = [cmd.overrides]
    sweep = cmd.env.get("SWEEP")
    if sweep is not None:  # slurm/array.sbatch: each line of the file, plus the command's own arguments
        lines = [ln for ln in (ROOT / sweep).read_text().splitlines() if ln.strip()]
        runs = [shlex.split(ln) + cmd.overrides for ln in lines]
    cfgs = []
    for overrides in runs:
        if cmd.multirun:
            overrides = first_of_sweeps(overrides)
        cfgs.append(compose(cmd.config, overrides=overrides, return_hydra_config=True))
    return cfgs


def check_module(name: str) -> None:
    """``python -m <name>`` runs: a module of this repository that has a script entry point."""
    assert name.split(".")[0] == "fusion", f"python -m {name}: not a module of this project"
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"python -m {name}: no such module"
    if spec.submodule_search_locations:  # a package runs its __main__
        assert importlib.util.find_spec(f"{name}.__main__") is not None, f"python -m {name}: no __main__.py"
    else:
        source = Path(spec.origin).read_text()
        assert re.search(r"""if __name__ == ["']__main__["']""", source), f"python -m {name}: no __main__ block"


def check(cmds: list[Command], root: Path = ROOT) -> None:
    """Every check of the module docstring, over ``cmds``; AssertionError naming the first failing command."""
    seen: set[tuple] = set()
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        for cmd in cmds:
            key = (cmd.config, tuple(cmd.overrides), cmd.multirun, cmd.env.get("SWEEP"), cmd.module, tuple(cmd.paths))
            if key in seen:  # the same command shown twice is composed once
                continue
            seen.add(key)
            try:
                for p in cmd.paths:
                    assert (root / p).exists(), f"{p} does not exist"
                if cmd.module:
                    check_module(cmd.module)
                if cmd.config:
                    compose_command(cmd)
            except Exception as e:
                raise AssertionError(f"{cmd.where}: {cmd.line!r}: {type(e).__name__}: {e}") from e


# ---- tests ----------------------------------------------------------------------------------------
def test_every_command_in_the_docs_composes_and_every_module_and_path_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_DATA_DIR", str(tmp_path))
    cmds = commands()
    hydra_cmds = [c for c in cmds if c.config]
    # The docs show many: a broken extractor that finds none must not pass.
    assert len(hydra_cmds) >= 60 and sum(bool(c.module) for c in cmds) >= 5, len(hydra_cmds)
    assert any(c.multirun for c in hydra_cmds) and any(c.config == "eval" for c in hydra_cmds)
    check(cmds)


def test_readme_shows_the_quick_start_and_the_docs_build():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for text in ("make train", "make test", "mkdocs build --strict"):
        assert text in readme, text
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_extractor_handles_continuations_comments_placeholders_and_sweeps():
    text = (
        "Prose with `python -m fusion.data.cache verify cache/x` inline.\n\n"
        "```bash\n"
        "python train.py -m +experiment=shapes \\\n"
        "    'encoder=[clip_tiny],[dino_tiny]'   # a sweep\n"
        "# python train.py +experiment=commented_out\n"
        "python eval.py +experiment=shapes ckpt_path=<run>/checkpoints/last.ckpt split=test\n"
        "python eval.py mode=extract ... cache.shard=$SLURM_ARRAY_TASK_ID cache.num_shards=8\n"
        "SWEEP=slurm/sweeps/shapes_subsets.txt sbatch --array=0-6 slurm/array.sbatch logger=csv\n"
        "```\n"
    )
    cmds = [c for c in (parse(line) for line in command_lines(text)) if c is not None]
    assert [c.config or c.module for c in cmds] == ["train", "eval", "eval", "train", "fusion.data.cache"]
    sweep, evaluate, extract, array, module = cmds
    assert sweep.multirun and sweep.overrides == ["+experiment=shapes", "encoder=[clip_tiny],[dino_tiny]"]
    assert first_of_sweeps(sweep.overrides) == ["+experiment=shapes", "encoder=[clip_tiny]"]
    assert evaluate.overrides[1] == "ckpt_path=x/checkpoints/last.ckpt"
    assert extract.overrides == ["mode=extract", "cache.shard=0", "cache.num_shards=8"]
    assert array.env == {"SWEEP": "slurm/sweeps/shapes_subsets.txt"} and array.overrides == ["logger=csv"]
    assert module.paths == []  # cache/x is a run output, not a repository path
    check(cmds)


@pytest.mark.parametrize(
    "line, message",
    [
        ("python train.py +experiment=no_such_experiment", "no_such_experiment"),
        ("python train.py -m +experiment=shapes fusion=token_concat,no_such_fuser", "no_such_fuser"),
        ("python eval.py +experiment=shapes training.no_such_key=1", "no_such_key"),
        ("python -m fusion.no_such_module", "no such module"),
        ("python -m fusion.model.transformer", "no __main__ block"),
        ("python bench/no_such_bench.py", "bench/no_such_bench.py does not exist"),
        ("sbatch slurm/train.sbatch +experiment=no_such_experiment", "no_such_experiment"),
    ],
)
def test_checker_refuses_a_command_that_does_not_exist(line, message):
    cmd = parse(line, "made-up.md")
    assert cmd is not None
    with pytest.raises(AssertionError, match=message):
        check([cmd])


# ---- the task page: a train and an eval command per task, the paper's grid as one multirun --------
DOWNSTREAM = sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml") if p.stem != "shapes")


def _task_page_commands() -> list[Command]:
    text = (ROOT / "docs" / "tasks.md").read_text()
    return [c for c in (parse(line) for line in command_lines(text)) if c is not None and c.config]


def test_task_page_multirun_covers_every_task_and_each_run_composes(monkeypatch, tmp_path):
    (multirun,) = [c for c in _task_page_commands() if c.multirun]
    sweep = dict(arg.split("=", 1) for arg in multirun.overrides)
    tasks, seeds = sweep["+experiment"].split(","), sweep["seed"].split(",")
    assert sorted(tasks) == DOWNSTREAM
    subsets = [s.split(",") for s in re.findall(r"\[([^\]]*)\]", sweep["encoder"])]
    assert len({frozenset(s) for s in subsets}) == 7 and set().union(*subsets) == {"clip", "dino", "vit"}
    monkeypatch.setenv("FUSION_DATA_DIR", str(tmp_path))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for task in tasks:
            overrides = [f"+experiment={task}", f"seed={seeds[-1]}", f"encoder=[{','.join(subsets[4])}]"]
            cfg = compose("train", overrides=overrides)
            assert cfg.experiment_name == task and cfg.seed == int(seeds[-1]), task
            assert list(cfg.encoder) == subsets[4] and cfg.task.root == f"{tmp_path}/{task}", task
            instantiate(cfg.task)  # the task config fits its loader's arguments (no data is read)


def test_task_page_gives_train_and_eval_commands_for_every_task():
    # That they compose is checked with every other command of the docs (first test above).
    scripts: dict[str, set[str]] = {}
    for cmd in _task_page_commands():
        given = dict(arg.split("=", 1) for arg in cmd.overrides)
        if cmd.multirun or "task.root" not in given:
            continue
        scripts.setdefault(given["+experiment"], set()).add(cmd.config)
        if cmd.config == "eval":
            assert "split" in given and "ckpt_path" in given, cmd.line
    assert scripts == {task: {"train", "eval"} for task in DOWNSTREAM}


# ---- the API reference: one page per package, every module once ------------------------------------
API = ROOT / "docs" / "api"
# Modules that are another module under an old name (documented where they point).
API_ALIASES = {"fusion.zoo.study"}


def _package_modules() -> set[str]:
    """Every module of fusion/ that git tracks (an uncommitted file of work in progress is not asked for)."""
    try:
        out = subprocess.run(["git", "ls-files", "fusion"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / f for f in out.stdout.split()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        files = list((ROOT / "fusion").rglob("*.py"))
    mods = set()
    for f in files:
        if f.suffix != ".py":
            continue
        parts = f.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(p.startswith("_") for p in parts):  # private modules and a package's __main__ may be left out
            mods.add(".".join(parts))
    return mods - API_ALIASES


def test_api_reference_has_every_module_once_on_its_packages_page():
    entries: dict[str, list[str]] = {}
    for page in sorted(API.glob("*.md")):
        for name in re.findall(r"^::: (\S+)", page.read_text(), re.M):
            entries.setdefault(name, []).append(page.name)
    twice = {name: pages for name, pages in entries.items() if len(pages) > 1}
    assert twice == {}, f"documented on more than one page: {twice}"
    missing = sorted(_package_modules() - set(entries))
    assert missing == [], f"modules without an entry in docs/api/: {missing}"
    for name, (page,) in entries.items():
        layer = name.split(".")[1] if name != "fusion" else None
        if layer is None:
            assert page == "index.md"
        elif layer in ("io", "options", "counter"):
            assert page == "foundations.md", name
        elif name.startswith("fusion.data.cache"):
            assert page == "data-cache.md", name
        else:
            assert layer in fusion.LAYERS and page == f"{layer}.md", f"{name} is on {page}, not {layer}.md"
