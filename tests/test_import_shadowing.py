"""The repository's `kernels/` folder never shadows Hugging Face's `kernels` (SPEC section 1).

transformers (5.25+) imports Hugging Face's `kernels` package whenever a model module loads.
`python -m ...`, `python -c` and `python -m pytest` put the working directory first on `sys.path`,
so every check here runs in a subprocess started in the repository root, with that root on
`sys.path`, the way users start the README's commands from a clone.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=300, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONSAFEPATH", None)  # the root must be on sys.path, as for a user in the clone
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_kernels_folder_is_no_package():
    # A regular package (an __init__.py) found first on sys.path wins over every later one; a plain
    # folder is at most a namespace portion, which any installed regular `kernels` package beats.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "rcgrpo_kernels" / "__init__.py").exists()


def test_model_modules_import_from_the_repository_root():
    code = (
        "import sys\n"
        "assert sys.path[0] in ('', %r), sys.path[:2]\n"
        "from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel\n"
        "import diffusers.loaders.peft\n"
        "from transformers import CLIPTextModel, T5EncoderModel\n"
        "import rcgrpo_kernels\n"
        "assert rcgrpo_kernels.acd_attention and rcgrpo_kernels.region_sq_dists\n"
        "print('ok')\n" % str(ROOT)
    )
    out = _run(["-c", code])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("module", ["rcgrpo.cli eval", "rcgrpo.train", "rcgrpo.reward_server"])
def test_module_entry_points_start_from_the_repository_root(module):
    out = _run(["-m", *module.split(), "--help"], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout


def test_a_real_job_runs_as_a_module_from_the_repository_root(tmp_path):
    # --help imports no model code; an edit with the tiny pipeline loads diffusers' Flux transformer,
    # peft and transformers' CLIP/T5: the path that failed with "cannot import name 'CUDAProperties'".
    out = _run(["-m", "rcgrpo.cli", "edit", "--model", "tiny", "--group-size", "2", "--steps", "1",
                "--output-dir", str(tmp_path / "edit")], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "edit" / "report.json").is_file()


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed")
def test_import_kernels_gives_hugging_face_package_from_the_repository_root():
    expected = importlib.util.find_spec("kernels").origin
    code = (
        "import importlib.metadata, kernels\n"
        "print(kernels.__file__)\n"
        "from kernels import CUDAProperties, get_kernel\n"
        "print(importlib.metadata.version('kernels'))\n"
    )
    out = _run(["-c", code], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    origin = out.stdout.splitlines()[0]
    assert Path(origin).resolve() == Path(expected).resolve()
    assert ROOT / "kernels" not in Path(origin).resolve().parents


def test_without_hugging_face_kernels_import_finds_nothing_of_ours():
    # No site-packages (-S), only the repository root and the standard library: whatever `kernels`
    # resolves to then, it is not our ops package, and what transformers imports from it fails cleanly.
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError:\n"
        "    print('absent'); raise SystemExit(0)\n"
        "assert getattr(kernels, '__file__', None) is None, kernels.__file__\n"
        "assert not hasattr(kernels, 'acd_attention') and not hasattr(kernels, 'rcgrpo_kernels')\n"
        "try:\n"
        "    from kernels import CUDAProperties\n"
        "except ImportError:\n"
        "    print('namespace only')\n"
        "else:\n"
        "    raise AssertionError('CUDAProperties came from the repository')\n" % str(ROOT)
    )
    out = _run(["-S", "-c", code], timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() in ("absent", "namespace only")


@pytest.mark.slow
def test_wheel_holds_rcgrpo_kernels_and_the_extension_and_no_top_level_kernels(tmp_path):
    pytest.importorskip("pybind11")
    if not list((ROOT / "kernels" / "rcgrpo_kernels").glob("_C*.so")):
        pytest.skip("the C++ backend is not built here (no compiler, or RCGRPO_NO_EXT)")
    # The build uses this environment's setuptools and pybind11 (no download); its temporary
    # build/ and egg-info folders go into a copy so the checkout is untouched.
    src = tmp_path / "src"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(src)], check=True, timeout=120)
    for rel in ("kernels", "pyproject.toml", "setup.py", "csrc"):  # the working tree, committed or not
        subprocess.run(["rm", "-rf", str(src / rel)], check=True)
        subprocess.run(["cp", "-r", str(ROOT / rel), str(src / rel)], check=True)
    for so in (src / "kernels" / "rcgrpo_kernels").glob("_C*.so"):
        so.unlink()
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rcgrpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rcgrpo_kernels/__init__.py" in names and "rcgrpo_kernels/acd_attention.py" in names
    assert any(n.startswith("rcgrpo_kernels/_C") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("kernels/") for n in names)
