"""`--help` of every command, and the README's flag tables, say the same thing (issue 11).

What `--help` prints is taken from the real command: ``cli.main([cmd, "--help"])`` runs with
``ArgumentParser.print_help`` recorded, so the parser that printed (and its actions) is the one the command
uses. The README is read as Markdown: under each ``### `catalog-index CMD``` heading, every table whose
first column is headed ``flag`` lists flags in backticks in that column (one or more per row) and has a
``default`` column. A default cell is ``required``, ``off`` (a switch), ``none...`` (no value), a number
(commas allowed, words may follow), a `literal` in backticks, or prose (not compared).
"""

import argparse
import os
import re

import pytest

from catalog_index import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
COMMANDS = ("index", "backfill", "train", "verify", "rollback", "gc", "models", "sample", "query", "serve")
# Beam's own flags, named in the README's synopses as examples of what passes through.
BEAM_FLAGS = {"--runner", "--direct_num_workers", "--direct_running_mode"}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# --- what --help prints -------------------------------------------------------------------------------

class Help:
    """One command's help: the parsers that printed (the command's, then its actions'), their text."""

    def __init__(self, parsers, text):
        self.parsers, self.text = parsers, text
        self.actions = {}  # primary (first dashed) spelling -> action
        for parser in parsers:
            for action in parser._actions:  # pylint: disable=protected-access
                if action.option_strings and action.dest != "help":
                    self.actions.setdefault(action.option_strings[0], (parser, action))

    def help_of(self, flag) -> str:
        parser, action = self.actions[flag]
        return parser._get_formatter()._expand_help(action)  # pylint: disable=protected-access

    def required(self, flag) -> bool:
        _, action = self.actions[flag]
        return action.required or self.help_of(flag).startswith("[required]")


def _printed_flags(text: str) -> set:
    """The flags listed in argparse's help text (lines "  --flag METAVAR, --alias METAVAR   help")."""
    out = set()
    for line in text.splitlines():
        if re.match(r"^ {2}-", line):
            for spelling in line.strip().split("  ")[0].split(", "):
                out.add(spelling.split(" ")[0])
    return out


@pytest.fixture(scope="module")
def helps():
    """{command: Help}, each from ``cli.main([command, "--help"])`` (and each `models` action's --help)."""
    import contextlib
    import io

    recorded = []
    original = argparse.ArgumentParser.print_help

    def record(self, file=None):
        recorded.append(self)
        return original(self, file)

    def run(argv):
        recorded.clear()
        out = io.StringIO()
        argparse.ArgumentParser.print_help = record
        try:
            with contextlib.redirect_stdout(out):
                try:
                    status = cli.main(argv)
                except SystemExit as e:  # argparse's own --help
                    status = e.code
        finally:
            argparse.ArgumentParser.print_help = original
        assert status in (0, None), (argv, out.getvalue())
        assert len(recorded) == 1, argv
        return recorded[0], out.getvalue()

    got = {}
    for command in COMMANDS:
        parser, text = run([command, "--help"])
        parsers, texts = [parser], [text]
        if command == "models":
            for sub in _subparsers(parser):
                sub_parser, sub_text = run(["models", sub, "--help"])
                parsers.append(sub_parser)
                texts.append(sub_text)
        got[command] = Help(parsers, "\n".join(texts))
    return got


def _subparsers(parser):
    for action in parser._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
            return list(action.choices)
    return []


# --- what the README says -----------------------------------------------------------------------------

def _cells(line: str) -> list:
    """A Markdown table row's cells; a | inside `code` does not split."""
    cells, cell, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return cells + [cell.strip()]


def readme():
    """{command: {"rows": [(flags, default cell, line number)], "synopsis": {flag: line number}}}."""
    sections, command, header, fenced = {}, None, None, False
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced, header = not fenced, None
            continue
        if fenced:
            if command is not None:
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line):
                    sections[command]["synopsis"].setdefault(flag, number)
            continue
        if command is not None:  # an inline synopsis: `catalog-index CMD --flag ...`
            for span in re.findall(r"`catalog-index " + command + r"\b([^`]*)`", line):
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span):
                    sections[command]["synopsis"].setdefault(flag, number)
        heading = re.match(r"^(#+)\s+(.*?)\s*$", line)
        if heading:
            named = re.fullmatch(r"`catalog-index (\w+)`", heading.group(2))
            command = named.group(1) if named and len(heading.group(1)) == 3 else None
            if command is not None:
                sections.setdefault(command, {"rows": [], "synopsis": {}})
            header = None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if all(set(c) <= set("-: ") for c in cells) or command is None or header[0] != "flag":
            continue
        flags = re.findall(r"`(--[a-z][\w-]*)`", cells[0])
        assert flags, f"README.md:{number}: no `--flag` in the first column of a flag table: {line}"
        assert "default" in header, f"README.md:{number}: a flag table without a default column"
        default = cells[header.index("default")]
        parts = [p.strip() for p in default.split(", ")]
        for i, flag in enumerate(flags):  # "`--a`, `--b` | 1, 1": one default each
            sections[command]["rows"].append(
                (flag, parts[i] if len(flags) > 1 and len(parts) == len(flags) else default, number))
    return sections


@pytest.fixture(scope="module")
def documented():
    return readme()


# --- the README's tables and --help agree -------------------------------------------------------------

def test_every_command_has_a_flag_table(documented):
    for command in COMMANDS:
        assert documented.get(command, {}).get("rows"), f"README: no flag table under `catalog-index {command}`"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_readme_table_lists_exactly_the_flags_of_help(command, helps, documented):
    rows = documented[command]["rows"]
    in_readme = [flag for flag, _, _ in rows]
    assert len(in_readme) == len(set(in_readme)), f"README: a flag twice in the {command} table: {in_readme}"
    in_help = set(helps[command].actions)
    assert in_help <= _printed_flags(helps[command].text)  # --help prints every one of them
    where = {flag: number for flag, _, number in rows}
    assert not set(in_readme) - in_help, {f: f"README.md:{where[f]}" for f in set(in_readme) - in_help}
    assert not in_help - set(in_readme), f"`catalog-index {command} --help` has flags the README's table " \
                                         f"lacks: {sorted(in_help - set(in_readme))}"


@pytest.mark.parametrize("command", COMMANDS)
def test_the_readme_synopsis_names_only_real_flags(command, helps, documented):
    known = set(helps[command].actions) | BEAM_FLAGS
    unknown = {f: f"README.md:{n}" for f, n in documented[command]["synopsis"].items() if f not in known}
    assert not unknown, f"{command}: flags in the README's code blocks that --help does not know: {unknown}"


def _stated(cell: str):
    """What a README default cell states: ("required",), ("off",), ("none",), ("number", x), ("literal", s)
    or None for prose."""
    cell = cell.strip()
    for word in ("required", "off", "none"):
        if re.match(word + r"\b", cell):
            return (word,)
    number = NUMBER.match(cell)
    if number:
        return ("number", float(number.group().replace(",", "")))
    literal = re.match(r"`([^`]+)`", cell)
    if literal:
        return ("literal", literal.group(1))
    return None


def _default_phrase(text: str) -> str:
    return text[text.index("(default: ") + len("(default: "):] if "(default: " in text else ""


@pytest.mark.parametrize("command", COMMANDS)
def test_the_readme_defaults_agree_with_help(command, helps, documented):
    problems = []
    for flag, cell, number in documented[command]["rows"]:
        if flag not in helps[command].actions:
            continue  # reported by the test above
        _, action = helps[command].actions[flag]
        text, stated = helps[command].help_of(flag), _stated(cell)
        required = helps[command].required(flag)
        switch = action.nargs == 0
        concrete = not switch and action.default is not None and action.default != argparse.SUPPRESS
        where = f"README.md:{number} {command} {flag} ({cell!r})"
        if required != (stated == ("required",)):
            problems.append(f"{where}: required in --help: {required}")
        elif switch and stated != ("off",):
            problems.append(f"{where}: a switch; its default cell should say off")
        elif concrete:
            if stated is None or stated[0] not in ("number", "literal"):
                problems.append(f"{where}: the default is {action.default!r}; the table should state it")
            elif stated[0] == "number" and (isinstance(action.default, str) or float(action.default) != stated[1]):
                problems.append(f"{where}: the default is {action.default!r}")
            elif stated[0] == "literal" and str(action.default) != stated[1]:
                problems.append(f"{where}: the default is {action.default!r}")
        elif stated is not None and stated[0] == "number":  # a default the code works out; --help states it
            found = NUMBER.search(_default_phrase(text))
            if not found or float(found.group().replace(",", "")) != stated[1]:
                problems.append(f"{where}: --help says {text!r}")
        elif stated is not None and stated[0] == "literal" and stated[1] not in text:
            problems.append(f"{where}: --help says {text!r}")
    assert not problems, "\n".join(problems)


# --- what --help shows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_every_flag_and_shows_its_default(command, helps):
    problems = []
    for flag, (_, action) in helps[command].actions.items():
        text = helps[command].help_of(flag)
        if not (action.help or "").strip():
            problems.append(f"{flag}: no help text")
            continue
        if action.nargs == 0 or action.required or action.default is None or action.default == argparse.SUPPRESS:
            continue
        found = NUMBER.search(_default_phrase(text))
        if isinstance(action.default, str):
            if str(action.default) not in _default_phrase(text):
                problems.append(f"{flag}: default {action.default!r} not shown: {text!r}")
        elif not found or float(found.group().replace(",", "")) != float(action.default):
            problems.append(f"{flag}: default {action.default!r} not shown as '(default: ...)': {text!r}")
    assert not problems, f"catalog-index {command} --help:\n" + "\n".join(problems)
    assert "None" not in helps[command].text and "default: False" not in helps[command].text


REQUIRED = {
    "index": {"--catalog", "--output"},
    "backfill": {"--catalog-pattern", "--from", "--to", "--output"},
    "train": {"--clicks", "--index", "--output"},
    "verify": {"--index"},
    "rollback": {"--index", "--to"},
    "gc": {"--output"},
    "models": {"--to"},
    "sample": {"--output"},
    "query": {"--index"},
    "serve": {"--index"},
}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_marks_the_required_flags(command, helps):
    marked = {flag for flag in helps[command].actions if helps[command].help_of(flag).startswith("[required]")}
    assert marked == REQUIRED[command]
    for parser in helps[command].parsers:
        usage = parser.format_usage()
        for flag in marked:
            if flag in parser._option_string_actions:  # pylint: disable=protected-access
                # In the usage line too: not inside [ ] (index and train check them themselves, after parsing).
                assert re.search(r"(?<!\[)" + re.escape(flag) + r"(?![\w-])", usage), (flag, usage)


def test_index_help_states_what_the_issue_found_missing(helps):
    index = helps["index"]
    for flag, shown in (("--shards", "1"), ("--trees", "50"), ("--seed", "0"), ("--batch-size", "32"),
                        ("--max-rejected-fraction", "0.05"), ("--max-image-pixels", "40000000")):
        assert f"(default: {shown}" in index.help_of(flag)
    assert "text vector" in index.help_of("--text-weight") and "image vector" in index.help_of("--image-weight")
    assert "big-endian" in index.help_of("--shards")


def test_backfill_help_names_the_index_flags_that_pass_through(helps):
    from pipelines import backfill

    text = " ".join(helps["backfill"].text.split())
    assert "passes through to each date's run" in text
    passing = set(helps["index"].actions) - set(backfill.SET_PER_DATE) - set(backfill.OWN)
    assert passing == set(backfill.passed_through())
    for flag in passing:
        assert re.search(re.escape(flag) + r"(?![\w-])", text), flag
    for flag in backfill.SET_PER_DATE:  # named as set by the backfill itself
        assert flag in text


# --- models: --model-cache before or after the action ---------------------------------------------------

@pytest.mark.parametrize("where", ["after", "before"])
def test_models_list_takes_the_model_cache_before_or_after_list(where, tmp_path, monkeypatch, capsys):
    from embedding import builtin

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.delenv(builtin.CACHE_ENV, raising=False)
    seen = []
    is_built = builtin.is_built
    monkeypatch.setattr(builtin, "is_built", lambda name, c=None: seen.append(c) or is_built(name, c))
    argv = ["models", "list", "--model-cache", str(cache)] if where == "after" else \
        ["models", "--model-cache", str(cache), "list"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert seen and set(seen) == {str(cache)}
    assert out.count("not built") == len(builtin.MODELS)
    assert not os.listdir(cache)  # list only reads


def test_models_model_cache_after_the_action_wins_and_is_optional(tmp_path, monkeypatch, capsys):
    from embedding import builtin

    seen = []
    monkeypatch.setattr(builtin, "is_built", lambda name, c=None: seen.append(c) or False)
    assert cli.main(["models", "--model-cache", str(tmp_path / "a"), "list", "--model-cache",
                     str(tmp_path / "b")]) == 0
    assert set(seen) == {str(tmp_path / "b")}
    seen.clear()
    assert cli.main(["models", "--model-cache", str(tmp_path / "a"), "list"]) == 0  # not reset by `list`
    assert set(seen) == {str(tmp_path / "a")}
    capsys.readouterr()
