"""Check the import layers of pyproject.toml with import-linter: `python tests/lint_layers.py`.

import-linter analyses packages, and our modules live at the top level of the repository, so this
copies them into a throwaway package `project` (imports rewritten to `project.<module>`, nothing else
changed) and runs `lint-imports` there with the contract from pyproject.toml.
"""
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_party(root: Path = ROOT) -> list[Path]:
    """The project's own modules: top-level .py files and the models/ and sources/ packages (not tests, bench, docs)."""
    return sorted(root.glob("*.py")) + sorted((root / "models").glob("*.py")) + sorted((root / "sources").glob("*.py"))


def packaged_copy(dest: Path, root: Path = ROOT, extra: dict[str, str] | None = None) -> Path:
    """dest/project/: every first-party module with `from X import` / `import X` made `project.X`.
    `extra` maps a module path (e.g. "diffusion.py") to a line appended to it, to try a broken layering."""
    names = {p.stem for p in root.glob("*.py")} | {"models", "sources"}
    pattern = re.compile(rf"^(\s*)(from|import) ({'|'.join(sorted(names))})\b", re.M)
    package = dest / "project"
    for path in first_party(root):
        target = package / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() + "\n" + (extra or {}).get(path.relative_to(root).as_posix(), "") + "\n"
        target.write_text(pattern.sub(r"\1\2 project.\3", text))
    (package / "__init__.py").write_text("")
    return package


def lint_layers(extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    with tempfile.TemporaryDirectory() as tmp:
        packaged_copy(Path(tmp), extra=extra)
        lines = [f"[importlinter]\nroot_packages =\n    {' '.join(config['root_packages'])}\n"]
        for i, contract in enumerate(config["contracts"]):
            lines.append(f"[importlinter:contract:{i}]")
            for key, value in contract.items():
                lines.append(f"{key} =" + "".join(f"\n    {v}" for v in value) if isinstance(value, list) else f"{key} = {value}")
        (Path(tmp) / ".importlinter").write_text("\n".join(lines) + "\n")
        # through this interpreter: a virtualenv's `lint-imports` is not on PATH unless the venv is activated
        command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
        return subprocess.run([sys.executable, "-c", command, "--no-cache"], cwd=tmp,
                              capture_output=True, text=True, env={"PYTHONPATH": tmp, "PATH": str(Path(sys.executable).parent)})


if __name__ == "__main__":
    result = lint_layers()
    print(result.stdout, result.stderr)
    sys.exit(result.returncode)
