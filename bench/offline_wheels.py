"""Wheels for installing llmkit on a GPU node that cannot reach a package index.

GPU nodes often come with torch, CUDA and part of the Hugging Face stack installed and no internet. Give this
script what the node has (`python3 -m pip list --format=freeze` run there, saved to a file; bare names are taken
as present in a version that fits) and it downloads, here, wheels of everything else llmkit and the chosen extras
need, for the node's Python, dependencies followed one by one so nothing the node already has (torch above all) is
fetched again. On the node:

    python3 -m pip install --no-index --find-links WHEELS --no-build-isolation -e ".[gpu,serve]"

    python bench/offline_wheels.py --have node-freeze.txt --python 3.12 --extras gpu,serve --add trl,openai --out .whl

Packages published only as source (DeepSpeed among them) are listed at the end instead: build those on the node or
leave their extra out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                       "manylinux1_x86_64"]  # fmt: skip


def read_have(path: Path) -> dict[str, Version | None]:
    """Installed packages of the node: `name==version` lines from pip freeze, or bare names."""
    have: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        try:
            have[canonicalize_name(name.split(" @ ")[0])] = Version(version) if version else None
        except ValueError:
            have[canonicalize_name(name)] = None
    return have


def llmkit_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            sys.exit(f"--extras: llmkit has no extra '{extra}' (it has {', '.join(project['optional-dependencies'])})")
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def download(requirement: Requirement, python: str, out: Path) -> Path | None:
    """One wheel, no dependencies; None when the package publishes no wheel for the node."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
             python, "--implementation", "cp", *platforms, "--dest", tmp, str(requirement)],
            capture_output=True, text=True,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            return None
        target = out / wheels[0].name
        wheels[0].replace(target)
        return target


def requirements_of(wheel: Path, extras: set[str], environment: dict[str, str]) -> list[Requirement]:
    """What a wheel needs on the node, with the extras it was asked for."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    needed = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            marker = requirement.marker
            if marker is None or any(marker.evaluate({**environment, "extra": e}) for e in {"", *extras}):
                needed.append(requirement)
    return needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--have", type=Path, required=True, help="the node's `pip list --format=freeze` (or names)")
    parser.add_argument("--python", default="3.12", help="the node's Python, major.minor")
    parser.add_argument("--extras", default="gpu,serve", help="llmkit extras to install there, comma-separated")
    parser.add_argument("--add", default="", help="more requirements, comma-separated (e.g. trl,openai for the tests)")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    args = parser.parse_args()

    have = read_have(args.have)
    environment = {**default_environment(), "python_version": args.python, "python_full_version": f"{args.python}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    queue = llmkit_requirements([e for e in args.extras.split(",") if e])
    queue += [Requirement(line) for line in args.add.split(",") if line]
    seen: set[str] = set()
    fetched, source_only = [], []
    while queue:
        requirement = queue.pop(0)
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate(environment)):
            continue
        seen.add(name)
        if name in have and (have[name] is None or requirement.specifier.contains(have[name], prereleases=True)):
            continue
        wheel = download(requirement, args.python, args.out)
        if wheel is None:
            source_only.append(str(requirement))
            continue
        fetched.append(wheel.name)
        print(f"{wheel.name} ({wheel.stat().st_size / 2**20:.1f} MiB)", flush=True)
        queue += requirements_of(wheel, requirement.extras, environment)

    size = sum((args.out / name).stat().st_size for name in fetched) / 2**20
    print(f"{len(fetched)} wheels, {size:.1f} MiB, in {args.out}")
    if source_only:
        print("no wheel for the node (build there, or leave its extra out): " + ", ".join(source_only))


if __name__ == "__main__":
    main()
