"""Flex Template metadata generated from the pipelines' own options (issue 12): one source of truth.

``metadata(pipeline)`` reads the argparse actions that the pipeline's PipelineOptions class adds
(``pipelines/options.py`` IndexOptions for ``index``, ``pipelines/train_options.py`` TrainOptions for
``train``) and turns each app flag into a Flex Template parameter:

- ``name``: the underscore spelling (``text_encoder``), which the options accept beside the dashed one;
  template parameter names cannot contain dashes. A flag without that spelling is an error here.
- ``label``: the name in words; ``helpText``: the flag's --help text (``%(default)s`` expanded, without the
  "[required] " mark); ``isOptional``: false exactly for the flags whose help starts with "[required]".
- ``defaultValue``: the flag's default as a string, where it has one (switches: ``false``).
- ``regexes``/``paramType``: ints, floats and switches have a fixed form; the flags that name a bucket
  path on Dataflow must be ``gs://``.

Switches (store_true flags such as ``--force``) become BOOLEAN parameters taking ``true`` or ``false``; the
launcher passes every parameter as ``--name=value``, which argparse refuses for a switch, so
``cli_argv`` (used by ``deploy/dataflow/main.py``) turns ``--force=true`` into ``--force`` and drops
``--force=false``. Everything else passes through unchanged (Beam's own options included).

The format: Dataflow's TemplateMetadata / ParameterMetadata (``deploy/dataflow/flex_template_metadata.schema.json``).
"""

import argparse
import json
import os
from typing import Iterable, List

PIPELINES = ("index", "train")

# Flags whose value is a bucket path on Dataflow (workers, and the launcher's short-lived disk, hold nothing).
GCS_PATHS = {
    "index": {"catalog", "output", "fusion_model", "model_cache", "image_root", "reuse_from"},
    "train": {"clicks", "index", "output", "image_root"},
}
GCS_REGEX = r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$"
INT_REGEX = r"^-?[0-9]+$"
FLOAT_REGEX = r"^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
BOOLEAN_REGEX = r"^(true|false)$"

DESCRIPTIONS = {
    "index": "Builds and publishes one multimodal Annoy index version from catalog Parquet "
             "(catalog-index index; every Beam/Dataflow option passes through).",
    "train": "Refits the fusion on logged clicks and publishes a models version "
             "(catalog-index train).",
}


def options_class(pipeline: str):
    if pipeline == "index":
        from pipelines.options import IndexOptions

        return IndexOptions
    if pipeline == "train":
        from pipelines.train_options import TrainOptions

        return TrainOptions
    raise ValueError(f"unknown pipeline {pipeline!r}; one of {', '.join(PIPELINES)}")


def app_actions(pipeline: str) -> tuple:
    """(parser, [actions]): the flags the pipeline's options class adds, in its order."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    options_class(pipeline)._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser, [a for a in parser._actions if a.option_strings]  # pylint: disable=protected-access


def is_switch(action) -> bool:
    return isinstance(action, argparse._StoreTrueAction)  # pylint: disable=protected-access


def parameter_name(action) -> str:
    """The underscore spelling the options accept (Flex Template parameter names cannot contain dashes)."""
    name = action.option_strings[0].lstrip("-").replace("-", "_")
    if "--" + name not in action.option_strings:
        raise ValueError(f"{action.option_strings[0]} has no underscore spelling --{name}; a Flex Template "
                         f"parameter could not name it")
    return name


def is_required(action) -> bool:
    return (action.help or "").startswith("[required]")


def default_value(action):
    """The default as the template states it (a string), or None where the flag has none."""
    if is_switch(action):
        return "false"
    if action.default is None or action.default is argparse.SUPPRESS:
        return None
    return str(action.default)


def _help_text(parser, action) -> str:
    text = parser._get_formatter()._expand_help(action)  # pylint: disable=protected-access
    text = text.removeprefix("[required]").strip()
    return text[:1].upper() + text[1:]


def _parameter(pipeline: str, parser, action) -> dict:
    name = parameter_name(action)
    out = {"name": name, "label": name.replace("_", " ").capitalize(), "helpText": _help_text(parser, action),
           "isOptional": not is_required(action)}
    default = default_value(action)
    if default is not None:
        out["defaultValue"] = default
    if is_switch(action):
        out["paramType"], out["regexes"] = "BOOLEAN", [BOOLEAN_REGEX]
    elif action.type is int:
        out["paramType"], out["regexes"] = "NUMBER", [INT_REGEX]
    elif action.type is float:
        out["paramType"], out["regexes"] = "NUMBER", [FLOAT_REGEX]
    elif name in GCS_PATHS[pipeline]:
        out["paramType"], out["regexes"] = "TEXT", [GCS_REGEX]
    else:
        out["paramType"] = "TEXT"
    return out


def metadata(pipeline: str) -> dict:
    """The Flex Template metadata of ``catalog-index PIPELINE``."""
    parser, actions = app_actions(pipeline)
    return {"name": f"catalog-index-{pipeline}", "description": DESCRIPTIONS[pipeline],
            "parameters": [_parameter(pipeline, parser, a) for a in actions]}


def render(pipeline: str) -> str:
    """metadata.json's text: keys sorted, parameters in the CLI's order, two-space indent, newline at the end."""
    return json.dumps(metadata(pipeline), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(pipeline: str, out_dir: str) -> str:
    """Writes OUT_DIR/metadata.json (a local folder, created when missing, ``file://`` or an object store such
    as gs://, through Beam's filesystems); returns its path. A local OUT_DIR that is a file: ConfigError."""
    from pipelines import files
    from schemas.errors import ConfigError
    from schemas.layout import local_path

    out_dir = local_path(out_dir)
    if files.is_local(out_dir) and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir!r} is a file, not a folder; pass a folder (it is created when missing)")
    path = files.join(out_dir, "metadata.json")
    try:
        files.write_bytes(path, render(pipeline).encode("utf-8"))
    except OSError as e:
        raise ConfigError(f"--out {out_dir!r}: cannot write {path} ({e.strerror or e})") from None
    return path


def cli_argv(pipeline: str, argv: Iterable[str]) -> List[str]:
    """The launcher's ``--name=value`` arguments as the CLI takes them: a switch parameter ``--x=true`` becomes
    ``--x``, ``--x=false`` is dropped (any case); everything else passes through unchanged."""
    _, actions = app_actions(pipeline)
    switches = {s for a in actions if is_switch(a) for s in a.option_strings}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag in switches:
            if value.strip().lower() == "true":
                out.append(flag)
            elif value.strip().lower() != "false":
                from schemas.errors import UsageError

                raise UsageError(f"{flag} takes true or false as a template parameter, got {value!r}")
            continue
        out.append(arg)
    return out
