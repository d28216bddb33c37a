"""The CI gate as users run it: the workflow's and the composite action's ``run:`` steps, in order.

``deploy/ci/robustness-gate.yml`` and ``deploy/ci/action.yml`` are parsed and their ``run:`` steps
executed with bash as GitHub runs them (``-eo pipefail``), with the workflow's ``env`` and the
``$GITHUB_ENV`` / ``$GITHUB_OUTPUT`` files GitHub provides, against a small labelled folder made
here. Skipped: ``uses:`` steps (checkout, setup-python, upload-artifact) and the install step (the
package under test is already installed). ``${{ ... }}`` expressions are evaluated for the contexts
the files use (``github``, ``vars``, ``inputs``, ``runner``, ``steps``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
import yaml

from tests.conftest import encode

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "deploy" / "ci" / "robustness-gate.yml"
ACTION = ROOT / "deploy" / "ci" / "action.yml"

PASSING = "max: {pan.p_change: 1.0, scale.flip_probability: 1.0}\nmin: {accuracy.top1: 0.0}\n"
FAILING = "max: {pan.p_change: 1.0}\nmin: {accuracy.top1: 0.99}\n"  # the folder holds photos lite0 cannot name


def _lookup(path: str, contexts: Mapping[str, Any]) -> Any:
    value: Any = contexts
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ""
        value = value[part]
    return value


def evaluate(text: str, contexts: Mapping[str, Any]) -> str:
    """``${{ a.b || 'c' }}`` -> the first truthy operand (context paths or quoted strings)."""

    def one(match: re.Match[str]) -> str:
        for operand in match.group(1).split("||"):
            operand = operand.strip()
            value = operand[1:-1] if operand[:1] == "'" else _lookup(operand, contexts)
            if value:
                return str(value)
        return ""

    return re.sub(r"\$\{\{\s*(.*?)\s*\}\}", one, str(text))


def run_steps(steps: list[dict[str, Any]], env: dict[str, str], contexts: dict[str, Any], cwd: Path,
              only: set[str] | None = None) -> dict[str, int]:
    """Run the ``run:`` steps like a GitHub runner; returns {step name: exit code}."""
    codes: dict[str, int] = {}
    failed = False
    github_env, github_output = cwd / "github_env", cwd / "github_output"
    for step in steps:
        name = step.get("name", "")
        if "uses" in step or name == "Install" or (only is not None and name not in only):
            continue
        if failed and "always()" not in str(step.get("if", "")):
            continue
        github_env.write_text("")
        github_output.write_text("")
        step_env = dict(env, GITHUB_ENV=str(github_env), GITHUB_OUTPUT=str(github_output))
        step_env.update({k: evaluate(v, contexts) for k, v in (step.get("env") or {}).items()})
        script = cwd / "step.sh"
        script.write_text(evaluate(step["run"], contexts))
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd,
                              env=step_env, capture_output=True, text=True, timeout=900)
        codes[name] = proc.returncode
        print(f"--- {name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        for line in github_env.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
        outputs = dict(line.partition("=")[::2] for line in github_output.read_text().splitlines() if "=" in line)
        if step.get("id"):
            contexts.setdefault("steps", {})[step["id"]] = {"outputs": outputs}
        failed = failed or proc.returncode != 0
    return codes


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four photos scikit-image ships, with labels: coffee is espresso (967); the others are labelled with
    classes no ImageNet model gives them, so top-1 accuracy is below 0.99 whatever the model."""
    from skimage import data

    folder = tmp_path_factory.mktemp("labelled")
    rows = ["file,class_index"]
    for name, label in (("coffee", 967), ("chelsea", 0), ("astronaut", 1), ("rocket", 2)):
        (folder / f"{name}.jpg").write_bytes(encode(np.asarray(getattr(data, name)())[..., :3], "JPEG", quality=92))
        rows.append(f"{name}.jpg,{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEADY_", "GITHUB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RUNNER_TEMP"] = str(tmp / "runner-temp")
    (tmp / "runner-temp").mkdir(exist_ok=True)
    return env


def test_both_files_parse_and_skip_only_uses_and_install() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["gate"]["steps"]
    assert [s["name"] for s in steps if "run" in s and s["name"] != "Install"] == \
        ["Export (parity-checked against PyTorch)", "Score", "Gate", "Collect gate decision"]
    action = yaml.safe_load(ACTION.read_text())
    assert action["runs"]["using"] == "composite" and set(action["inputs"]) >= {"model", "data", "policy"}
    assert all(s.get("shell") == "bash" for s in action["runs"]["steps"] if "run" in s)
    assert evaluate("${{ vars.X || 'dflt' }}", {"vars": {}}) == "dflt"
    assert evaluate("${{ vars.X || 'dflt' }}", {"vars": {"X": "set"}}) == "set"


@pytest.mark.slow
def test_workflow_gate_passes_and_fails_with_the_policy(labelled: Path, tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    passing, failing = tmp_path / "pass.yaml", tmp_path / "fail.yaml"
    passing.write_text(PASSING)
    failing.write_text(FAILING)
    workspace = tmp_path / "workspace"
    shutil.copytree(ROOT / "deploy", workspace / "deploy")  # what actions/checkout provides
    contexts: dict[str, Any] = {"github": {"workspace": str(workspace)},
                                "vars": {"STEADY_DATA_DIR": str(labelled), "STEADY_GATE_POLICY": str(passing)}}
    env = _base_env(tmp_path)
    env.update({k: evaluate(v, contexts) for k, v in workflow["env"].items()})
    steps = workflow["jobs"]["gate"]["steps"]
    codes = run_steps(steps, env, contexts, workspace)
    assert codes == {"Export (parity-checked against PyTorch)": 0, "Score": 0, "Gate": 0, "Collect gate decision": 0}
    assert (workspace / "robustness-report" / "report.html").is_file()
    assert '"decision": "pass"' in (workspace / "robustness-report" / "gate.json").read_text()
    env["GATE_POLICY"] = str(failing)
    assert run_steps(steps, env, contexts, workspace, only={"Gate"}) == {"Gate": 1}


@pytest.mark.slow
def test_composite_action_fails_the_job_when_the_gate_fails(labelled: Path, tmp_path: Path) -> None:
    action = yaml.safe_load(ACTION.read_text())
    failing = tmp_path / "fail.yaml"
    failing.write_text(FAILING)
    inputs = {k: v.get("default", "") for k, v in action["inputs"].items()}
    inputs.update(data=str(labelled), policy=str(failing))
    contexts: dict[str, Any] = {"inputs": inputs, "runner": {"temp": str(tmp_path / "runner-temp")}}
    env = _base_env(tmp_path)
    env["GITHUB_ACTION_PATH"] = str(ACTION.parent)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    codes = run_steps(action["runs"]["steps"], env, contexts, workspace)
    assert codes == {"Export": 0, "Score": 0, "Gate": 1}
    assert contexts["steps"]["gate"]["outputs"]["decision"] == "fail"
    assert contexts["steps"]["export"]["outputs"]["version"] == "1"
    assert '"decision": "fail"' in (tmp_path / "runner-temp" / "robustness-report" / "gate.json").read_text()
    # the default policy is the action's own deploy/gate.yaml
    inputs["policy"] = ""
    env["STEADY_REPO_DIR"], env["STEADY_MODEL"], env["STEADY_VERSION"] = (
        str(tmp_path / "runner-temp" / "steady-models"), "efficientnet-lite0", "1")
    assert run_steps(action["runs"]["steps"], env, contexts, workspace, only={"Gate"})["Gate"] in (0, 1)
    assert "deploy/ci/../gate.yaml" in (tmp_path / "runner-temp" / "robustness-report" / "gate.json").read_text()
