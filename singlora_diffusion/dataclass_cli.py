"""Command lines derived from a config dataclass: one flag per field, help from its metadata.

Booleans take `--flag` (true, as in diffusers' scripts) or `--flag false`; Optional fields
take `none`. Flags not given are left out of the result, so a YAML file or the dataclass
defaults fill them.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _field_type(cls, f: dataclasses.Field):
    """(python type, optional?) of an annotation like `int | None` (str for multi-type unions)."""
    hint = typing.get_type_hints(cls)[f.name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return (args[0] if len(args) == 1 else str), type(None) in typing.get_args(hint)


def parse_value(text: str, kind, optional: bool):
    if optional and text.lower() in ("none", "null", ""):
        return None
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def dataclass_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kind, optional = _field_type(cls, f)
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        convert = lambda t, k=kind, o=optional: parse_value(t, k, o)
        if kind is bool:
            p.add_argument(f"--{f.name}", nargs="?", const=True, type=convert, help=help_text)
        else:
            p.add_argument(f"--{f.name}", type=convert, choices=f.metadata.get("choices"), help=help_text)
    return p


def run_command(prog: str, job) -> int:
    """Run job() as a command: a UserError prints one line (exit 2), Ctrl-C exits 130; anything else keeps its traceback.

    Under several processes the interpreter is left with os._exit: gloo can abort at
    interpreter teardown after collective work ("terminate called without an active
    exception") even when everything succeeded.
    """
    import os
    import sys

    from .errors import UserError

    code = 0
    try:
        job()
    except KeyboardInterrupt:
        code = 130
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
