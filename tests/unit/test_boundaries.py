"""The tiers stay apart: workers never import Flask, the web tier never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config.settings import ROOT


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["workers.tasks", "workers.celery_app", "workers.engine", "workers.handler"])
def test_workers_leave_flask_out(module):
    assert "flask" not in modules_after_import(module)


@pytest.mark.parametrize("module", ["app.web", "app.web.ws", "app.web.api", "app.web.identity", "app.storage",
                                    "app.streams"])
def test_web_tier_leaves_torch_out(module):
    loaded = modules_after_import(module)
    assert "torch" not in loaded and "transformers" not in loaded
