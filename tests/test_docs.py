"""The README stays one page and its links resolve; generated docs match what generates them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_one_page_and_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 80, "README.md is one page: move details into docs/"
    fence = re.search(r"```bash\n(.*?)```", text, re.S)
    assert fence and fence.start() < 30
    commands = [line.split("#")[0].strip() for line in fence.group(1).splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert (ROOT / script).is_file()


def test_readme_and_docs_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_names_only_modules_that_exist():
    text = (ROOT / "README.md").read_text()
    for path in re.findall(r"`((?:stages|products|faces|orchestration|ground)/[\w/.]*)`", text):
        assert (ROOT / "laion_dask" / path).exists(), path
    for name in re.findall(r"`(\w+\.py)`", text):
        assert list((ROOT / "laion_dask").rglob(name)), name


def test_benchmarks_page_is_generated_from_the_results_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_benchmark_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
