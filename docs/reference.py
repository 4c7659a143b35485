"""Writes docs/configuration.md from the recipe schema itself (engine/config.py): every section, every key, its
type, its default and the comment beside it in the code. ``python docs/reference.py`` rewrites the page;
tests/test_docs.py fails when the page and the code differ, so the reference cannot drift."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

from biodistill.engine import config

PAGE = Path(__file__).with_name("configuration.md")
SECTIONS = [("teacher", config.TeacherConfig), ("student", config.StudentConfig), ("data", config.DataConfig),
            ("losses", config.LossesConfig), ("losses.terms[i]", config.LossTermConfig),
            ("optim", config.OptimConfig), ("train", config.TrainConfig), ("deepspeed", config.DeepSpeedSection),
            ("task", config.TaskSection), ("task.finetune", config.TeacherFinetune)]  # fmt: skip


def comments(cls) -> dict[str, str]:
    """Each field's comment in the class body (and its dataclass bases'): the lines above it and the one beside it."""
    out, above = {}, []
    bases = [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)]
    for line in (line for c in bases for line in inspect.getsource(c).splitlines()[1:]):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
        elif ":" in stripped and not stripped.startswith(('"""', "def ", "@")):
            name = stripped.split(":")[0].strip()
            beside = stripped.split("  # ", 1)[1] if "  # " in stripped else ""
            out[name] = " ".join([*above, beside]).strip()
            above = []
        else:
            above = []
    return out


def kind(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(kind(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {kind(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return ""
    return f"`{value!r}`" if value not in ("", None) else ('`""`' if value == "" else "`null`")


def page() -> str:
    lines = ["# Configuration reference", "",
             "Every key a recipe (`configs/*.yaml`) can set, by section, with its type and default. Any key is also a "
             "command-line flag: `--train.max_steps 50`. The `task` section makes a recipe a task-specific distillation "
             "([task.md](task.md)). Written from `engine/config.py` by `python docs/reference.py`; "
             "`tests/test_docs.py` fails when the two differ. The loss kinds and what each reads are in "
             "[recipes.md](recipes.md); evaluation suites have their own schema (`engine/evaluate/suite.py`, "
             "[evaluation.md](evaluation.md)).", ""]  # fmt: skip
    for section, cls in SECTIONS:
        said, hints = comments(cls), typing.get_type_hints(cls)
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal") or (cls is config.LossesConfig and f.name == "terms"):
                continue
            meaning = said.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {kind(hints[f.name])} | {default(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    PAGE.write_text(page())
    print(f"wrote {PAGE}", file=sys.stderr)
