"""The Prefect UI in headless Chromium: open a deployment that `batchinfer serve` registered, start a
custom run with a parameter changed in the form, and watch the run complete.

The server behind the UI is on PostgreSQL, as deployments/README.md advises for a server that people
click in: on SQLite, a write that lands while the form's request reads (a `serve` process polling, say)
makes the server answer 503, which Prefect's Python client retries and the UI does not (BENCHMARKS.md,
"The UI on SQLite"). Screenshots of each step are kept in test-artifacts/browser/. Chromium is Debian's
package (scripts/install-ui-test.sh), driven by playwright's Python package through `executable_path`, so
no browser is downloaded. Without Chromium or playwright the test fails and says what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest

from tests.postgres import PostgresServer
from tests.prefect_stack import ARTIFACTS, BATCHINFER, PrefectStack

pytestmark = [pytest.mark.browser, pytest.mark.prefect_server]

SHOTS = ARTIFACTS / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEPLOYMENT = "ui-form"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("BATCHINFER_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright's Python package: pip install -e '.[test]'")
    executable = chromium_path()
    if executable is None:
        pytest.fail(
            "Chromium is not installed (looked at $BATCHINFER_CHROMIUM, chromium on PATH, /usr/bin/chromium); "
            "install it with scripts/install-ui-test.sh"
        )
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "failure.png").unlink(missing_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def database():
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(database, tmp_path_factory):
    """`prefect server start` on a PostgreSQL database of its own."""
    stack = PrefectStack(
        tmp_path_factory.mktemp("prefect-postgres"), label="postgres", database=database.prefect_settings
    )
    try:
        stack.start_server()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def served(stack, tabular, tmp_path_factory):
    """`batchinfer serve` with the defaults a team would give it; runs it starts are subprocesses."""
    root = tmp_path_factory.mktemp("served")
    argv = [
        BATCHINFER, "serve", "--name", DEPLOYMENT, "--verbose",
        "--input", tabular["input"], "--model", "mlp", "--checkpoint", tabular["checkpoint"],
        "--output", str(root / "default-output"),
        "--params", json.dumps({"compute": {"devices": "cpu", "shard_rows": 5_000}}),
    ]  # fmt: skip
    stack.start("serve", argv)
    with stack.client() as client:
        deployment = stack.wait_for_deployment(client, f"batch-inference/{DEPLOYMENT}", "serve")
    yield {"deployment": deployment, "root": root}
    stack.stop("serve", sig=signal.SIGINT, grace=10)


def form_field(page, label: str):
    """The input of the form property whose label starts with `label` (the innermost property)."""
    title = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$"))
    prop = title.locator(
        "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"
    )
    return prop.locator("textarea, input").first


def test_custom_run_from_the_deployment_form_completes(browser, database, stack, served):
    deployment, root = served["deployment"], served["root"]
    chosen_output = root / "from-the-form"
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(30_000)
    try:
        page.goto(f"{stack.url}/deployments/deployment/{deployment.id}")
        page.get_by_text(DEPLOYMENT, exact=True).first.wait_for()
        page.screenshot(path=SHOTS / "01-deployment.png")

        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").first.click()
        page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment.id}/run"))
        output_uri = form_field(page, "Output URI")
        output_uri.wait_for()
        assert output_uri.input_value() == str(root / "default-output")  # the deployment's default is shown
        page.screenshot(path=SHOTS / "02-form.png", full_page=True)

        output_uri.fill(str(chosen_output))
        form_field(page, "Batch size").fill("128")
        run_name = page.locator(".flow-run-name-input input").input_value()
        assert run_name
        page.screenshot(path=SHOTS / "03-form-changed.png", full_page=True)
        with page.expect_response(re.compile(r"/api/deployments/[^/]+/create_flow_run$")) as created:
            page.get_by_role("button", name="Submit").click()
        assert created.value.status == 201, created.value.text()
        run_id = created.value.json()["id"]
        # The UI confirms with a notice naming the new run; then open the run's page.
        page.get_by_text(run_name).first.wait_for()
        page.goto(f"{stack.url}/runs/flow-run/{run_id}")
        with stack.client() as client:
            run = stack.wait_for_run(client, run_id, logs=("serve",))
        assert run.state_name == "Completed", (run.state.message, stack.tail("serve"))
        # The page polls the API every few seconds; wait for it to show the final state.
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=SHOTS / "04-run-completed.png", full_page=True)
        page.get_by_role("tab", name="Artifacts").or_(page.get_by_text("Artifacts", exact=True)).first.click()
        page.get_by_text("batchinfer-report").first.wait_for()
        page.screenshot(path=SHOTS / "05-run-artifacts.png", full_page=True)
    except Exception:
        page.screenshot(path=SHOTS / "failure.png", full_page=True)
        raise
    finally:
        page.close()

    # The run got what the form said, and the work followed it.
    assert run.deployment_id == deployment.id
    assert database.query(f"SELECT state_type FROM flow_run WHERE id = '{run_id}'") == "COMPLETED"
    assert run.parameters["output"]["uri"] == str(chosen_output)
    assert run.parameters["compute"]["batch_size"] == 128
    assert run.parameters["input"]["uri"] == deployment.parameters["input"]["uri"]
    assert (chosen_output / "_SUCCESS").exists() and not (root / "default-output").exists()
    manifest = json.loads((chosen_output / "manifest.json").read_text())
    assert manifest["config"]["compute"]["batch_size"] == 128 and manifest["state"] == "succeeded"
    for name in ("01-deployment", "02-form", "03-form-changed", "04-run-completed", "05-run-artifacts"):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000, name
