"""MindFormers run configs (its Llama pretrain YAMLs) as lmforge input: see convert.py for the mapping."""

from lmforge.mindformers.convert import convert, looks_like_mindformers
from lmforge.mindformers.files import (
    conversion_report,
    convert_file,
    convert_if_mindformers,
    load_run_config,
    print_once,
)

__all__ = [
    "conversion_report",
    "convert",
    "convert_file",
    "convert_if_mindformers",
    "load_run_config",
    "looks_like_mindformers",
    "print_once",
]
