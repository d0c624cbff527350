"""The sans-IO codec and the error tree import nothing of the HTTP stack, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HTTP_STACK = (
    "sanic", "sanic_ext", "sanic_routing", "httpx", "httpx_aiohttp", "aiohttp", "pydantic"
)


@pytest.mark.parametrize(
    "module",
    [
        "sanic_streamplus.sse",
        "sanic_streamplus.errors",
        "sanic_streamplus.machine",
        "sanic_streamplus.splice",
    ],
)
def test_the_codec_and_the_errors_load_no_http_stack(module: str) -> None:
    probe = (
        f"import json, sys, {module}\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout))
    assert "sanic_streamplus" in loaded  # the probe did import the package
    assert loaded.isdisjoint(HTTP_STACK), sorted(loaded & set(HTTP_STACK))


def test_the_public_names_still_import_from_the_package() -> None:
    probe = (
        "import sanic_streamplus as s\n"
        "missing = [n for n in s.__all__ if getattr(s, n, None) is None]\n"
        "assert sorted(s.__all__) == sorted(s._MODULE_OF), 'one list of public names'\n"
        "print(missing)"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
