"""The command line, the load cache, self-containment of generated files, and the packaged wheel."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import EXAMPLES, ROOT


def mirasc(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "mirasc", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, env=env, timeout=300)


def test_compile_all_examples(tmp_path):
    r = mirasc("compile", *map(str, EXAMPLES), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    written = sorted(p.stem for p in tmp_path.glob("*.py"))
    assert written == sorted(p.stem for p in EXAMPLES)
    text = (tmp_path / "moneta.py").read_text()
    assert "Moneta" in text and "sha256" in text and "mirasc" in text.splitlines()[0].lower()


def test_check_and_explain():
    r = mirasc("check", str(ROOT / "examples" / "yaad.miras"))
    assert r.returncode == 0 and "ok" in r.stdout
    r = mirasc("explain", str(ROOT / "examples" / "moneta.miras"))
    assert r.returncode == 0, r.stderr
    assert "Moneta" in r.stdout and len(r.stdout.splitlines()) >= 3


def test_bad_spec_reports_location_without_traceback(tmp_path):
    bad = tmp_path / "bad.miras"
    bad.write_text("layer Bad {\n    memory linear\n    bias lpp(p=3)\n    retention none\n"
                   "    algorithm gd(lr=1)\n}\n")
    r = mirasc("compile", str(bad), "-o", str(tmp_path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"{bad}:3:10" in r.stderr and "^" in r.stderr
    assert not list(tmp_path.glob("*.py"))


def test_missing_file_is_a_plain_error(tmp_path):
    r = mirasc("check", str(tmp_path / "nope.miras"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "cannot read" in r.stderr


def test_generated_file_runs_without_mirasc(tmp_path):
    """Generated code is self-contained: it must import and run with mirasc made unimportable."""
    r = mirasc("compile", str(ROOT / "examples" / "yaad.miras"), "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    code = (
        "import sys; sys.modules['mirasc'] = None\n"  # any `import mirasc` now raises ImportError
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import torch, yaad\n"
        "layer = yaad.Yaad(32)\n"
        "y, state = layer(torch.randn(2, 10, 32))\n"
        "y.sum().backward()\n"
        "print('ran', tuple(y.shape))\n"
    )
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "ran (2, 10, 32)" in r.stdout


def test_load_uses_a_content_keyed_cache(tmp_path):
    """Several processes loading one spec at once all succeed and share one cached file."""
    env = dict(os.environ, MIRASC_CACHE=str(tmp_path / "cache"))
    spec = ROOT / "examples" / "deltanet.miras"
    code = f"import mirasc; m = mirasc.load({str(spec)!r}); print(m.DeltaNet.__name__)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.strip() == "DeltaNet"
    cached = list((tmp_path / "cache").glob("*.py"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".*tmp"))
    # An edited spec is a different key.
    edited = tmp_path / "deltanet.miras"
    edited.write_text(spec.read_text().replace("init=0.5", "init=0.25"))
    subprocess.run([sys.executable, "-c", code.replace(str(spec), str(edited))], env=env, check=True,
                   cwd=ROOT, capture_output=True, timeout=300)
    assert len(list((tmp_path / "cache").glob("*.py"))) == 2


@pytest.mark.slow
def test_wheel_ships_grammar_and_templates(tmp_path):
    """A non-editable install works: the wheel carries the grammar and the templates."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp_path / "dist").glob("mirasc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mirasc/grammar/miras.lark" in names
    assert any(n.startswith("mirasc/templates/") and n.endswith(".j2") for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=600)
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import mirasc\n"
            f"assert mirasc.__file__.startswith({str(site)!r}), mirasc.__file__\n"
            f"print(mirasc.compile_file({str(ROOT / 'examples' / 'memora.miras')!r}, {str(tmp_path / 'out')!r}))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "memora.py").exists()


@pytest.mark.parametrize("name", ["yaad", "cauchy"])
def test_bench_prints_a_table(name):
    """`mirasc bench` runs every applicable backend and prints one row each (timings are not checked)."""
    r = mirasc("bench", str(ROOT / "examples" / f"{name}.miras"), "--batch", "1", "--seq", "32", "--reps", "1",
               "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "| memory, torch backend |" in r.stdout and "| one decode step |" in r.stdout
    assert "(SDPA)" in r.stdout
    assert ("triton backend" in r.stdout) == (name == "cauchy")  # MLP kernels are timed on CUDA only
