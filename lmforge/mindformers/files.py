"""MindFormers run configs from files: `lmforge config convert`, and loading for train and plan."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lmforge.config import config_from_dict, config_from_tree, load_yaml
from lmforge.errors import ConfigError
from lmforge.mindformers.convert import convert, looks_like_mindformers


def conversion_report(mapped: list, ignored: list, source: str) -> str:
    """The table of mapped keys, then one line per ignored key."""
    width = max(len(k) for k, _, _ in mapped)
    target = max(len(t) for _, t, _ in mapped)
    lines = [
        f"{source}: MindFormers run config, mapped to lmforge:",
        f"  {'MindFormers':<{width}}  {'lmforge':<{target}}  value",
    ]
    lines += [f"  {k:<{width}}  {t:<{target}}  {v}" for k, t, v in mapped]
    lines += [f"  ignored {k}: {why}" for k, why in ignored]
    return "\n".join(lines)


def convert_if_mindformers(tree: dict, source: str, report=None) -> dict:
    """`tree` itself for an lmforge config; for a MindFormers one its conversion, after passing the
    conversion report (text) to `report` when given."""
    if not looks_like_mindformers(tree):
        return tree
    converted, mapped, ignored = convert(tree, source)
    if report is not None:
        report(conversion_report(mapped, ignored, source))
    return converted


def print_once(text: str) -> None:
    """Print on rank 0 only (every rank of a launched job converts the same file)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def convert_file(source: str, out: str, overwrite: bool = False) -> None:
    """`lmforge config convert`: write the lmforge YAML, print the table; the file appears only
    complete (temporary sibling, renamed) and never replaces one unless `overwrite`."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; choose another --out or pass --overwrite")
    if target.is_dir():
        raise ConfigError(f"{out}: is a directory; pass a file name for --out")
    tree = load_yaml(source)
    if not looks_like_mindformers(tree):
        raise ConfigError(
            f"{source}: not a MindFormers run config (no model.model_config, runner_config or parallel_config)"
        )
    converted, mapped, ignored = convert(tree, source)
    cfg = config_from_dict(converted, f"{source} (converted)")
    header = f"# Converted from the MindFormers run config {source} by `lmforge config convert`.\n"
    text = header + yaml.safe_dump(converted, sort_keys=False)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write: {exc}") from None
    print(conversion_report(mapped, ignored, source))
    print(
        f"wrote {out} ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}); run it with: lmforge train --config {out}"
    )


def load_run_config(path: str, overrides: list[str] | None = None, notes: list[str] | None = None):
    """`config.load_config` that also reads MindFormers run configs (summarised in `notes`)."""
    tree = load_yaml(path)
    if looks_like_mindformers(tree):
        tree, mapped, ignored = convert(tree, str(path))
        if notes is not None:
            notes.append(
                f"{path}: MindFormers run config: {len(mapped)} keys mapped, {len(ignored)} ignored "
                f"(`lmforge config convert {path} --out lmforge.yaml` lists them)"
            )
    return config_from_tree(tree, str(path), overrides, notes)
