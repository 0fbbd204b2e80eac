"""No ingredient is named outside `recipe/`: plan, ablate, export, import, the pipeline and the trainer read
what they need from the `Ingredient` class (issue 28: "one file and one line" per ingredient).

The rule, checked on every module of src/daybreak outside src/daybreak/recipe/ with Python's tokenizer:
a key of `INGREDIENTS` must not appear
- as a name in the code (`cfg.repa`, `sprint = ...`), nor
- as a word in a string literal that is not a docstring (`"tread.start=1"`, `"(tread or sprint)"`), a
  word being bounded by anything but a letter, digit, `_` or `-`; so `repa_teacher` and the CLI flag
  `--drop-sprint-fusion` are other words.
Comments and docstrings are prose and may name them.
"""

import ast
import io
import re
import tokenize
from pathlib import Path

from daybreak.recipe import INGREDIENTS

SRC = Path(__file__).resolve().parents[2] / "src" / "daybreak"
# string literals; from Python 3.12 an f-string's text is its own token
STRINGS = {tokenize.STRING} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def ingredient_names_in(source: str) -> list[tuple[int, str]]:
    """(line, token) of every use of an ingredient's name in `source` under the rule above."""
    words = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, INGREDIENTS)) + r")(?![\w-])")
    docs = _docstring_lines(ast.parse(source))
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in INGREDIENTS:
            found.append((tok.start[0], tok.string))
        elif tok.type in STRINGS and tok.start[0] not in docs and words.search(tok.string):
            found.append((tok.start[0], tok.string))
    return found


def test_the_rule_catches_each_form():
    code = ('"""A docstring may say tread and sprint."""\n'
            'x = cfg.repa.enabled  # a comment may say perceptual\n'
            'y = ["tread.start=1", "repa_teacher", "--drop-sprint-fusion", f"{a} (contrastive)"]\n')
    found = ingredient_names_in(code)
    assert [line for line, _ in found] == [2, 3, 3]
    assert found[0][1] == "repa" and "tread.start=1" in found[1][1] and "(contrastive)" in found[2][1]


def test_no_ingredient_is_named_outside_recipe():
    leaks = [f"{path.relative_to(SRC)}:{line}: {text}" for path in sorted(SRC.rglob("*.py"))
             if "recipe" not in path.relative_to(SRC).parts
             for line, text in ingredient_names_in(path.read_text())]
    assert not leaks, "ingredient names outside recipe/ (read them from the Ingredient class):\n" + "\n".join(leaks)


def test_pretrained_keys_are_the_sections_own_keys():
    """`ablate --check` prints these keys for the user to set: each must be a key of the ingredient's section."""
    from dataclasses import fields

    for name, cls in INGREDIENTS.items():
        section = cls.Config(enabled=True)
        for key in cls.pretrained(section):
            assert key.split(".")[0] == name and key.split(".")[1] in {f.name for f in fields(cls.Config)}, key
    assert set(INGREDIENTS["perceptual"].pretrained(INGREDIENTS["perceptual"].Config(True, lpips_weight=0))) == {
        "perceptual.dino_path"}  # a network whose loss weighs 0 is not loaded
