"""The scripts copy the eLSTM on purpose (each stands alone); the copies must stay one text."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("rtrl_a2c_atari.py", "rtrl_a2c_procgen.py", "rtrl_a2c_minigrid.py", "rtrl_impala_dmlab.py")


def class_source(script, name="ELSTM"):
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    (node,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name]
    return ast.get_source_segment(text, node)


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_every_script_has_the_same_elstm_text(script):
    assert class_source(script) == class_source(SCRIPTS[0]), f"{script}'s ELSTM differs from {SCRIPTS[0]}'s"
