"""Run the official client's own kernels and datasets integration tests against the emulator.

The Kaggle client ships tests/backend/backend_tests.py (kaggle-cli, tag v2.2.3) for a backend on
http://localhost with KAGGLE_API_ENVIRONMENT=LOCALHOST. This script serves an emulator there and runs that
suite's 20 kernels and datasets tests from a kaggle-cli checkout, with the smallest harness changes an empty
backend needs (nothing of the suite is copied into this project; the changes are made to a temporary copy):

- the public accounts' kernels it reads become the test user's own: `kernels list --user stevemessick` lists
  the test user's kernels, and `kernels output kerneler/sqlite-global-default` reads the fixture kernel
  `<user>/kaggleapi-fixture-kernel`, pushed and run first;
- the public dataset catalog is one public fixture dataset, `<user>/kaggleapi-fixture`, created first, which
  the dataset tests use instead of looking up the catalog's most-voted dataset;
- with --fast (the default), its fixed sleeps after a push or a create (30 s, 10 s) are 3 s: the emulator
  is ready long before.

Expected: 20 tests, every one passing except test_dataset_a_list, whose second assertion wants more than ten
public BigQuery datasets (the emulator has no public catalog).

    python benchmarks/official_backend_tests.py --kaggle-cli ~/src/kaggle-cli [--slow]

Port 80 is used when this process may bind it (root, free); otherwise the client's LOCALHOST endpoint is
pointed at a free port through a sitecustomize on PYTHONPATH, the only change to the client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER, KEY = "testuser", "local_api_token"
SWAPS = {
    # the catalog's most-voted dataset, which each dataset test looks up again: the fixture instead
    '    dataset = ""\n': '    dataset = test_user + "/kaggleapi-fixture"\n',
    'user="stevemessick"': "user=test_user",
    '"kerneler/sqlite-global-default"': 'test_user + "/kaggleapi-fixture-kernel"',
}
FAST_SWAPS = {"time.sleep(30)": "time.sleep(3)", "time.sleep(10)": "time.sleep(3)"}


def prepared_suite(checkout: Path, work: Path, fast: bool) -> Path:
    source = checkout / "tests" / "backend"
    if not (source / "backend_tests.py").is_file():
        raise SystemExit(f"{source}/backend_tests.py not found: --kaggle-cli names a kaggle-cli checkout")
    suite = work / "tests" / "backend"
    shutil.copytree(source, suite)
    text = (suite / "backend_tests.py").read_text()
    for old, new in {**SWAPS, **(FAST_SWAPS if fast else {})}.items():
        if old not in text:
            raise SystemExit(f"backend_tests.py no longer contains {old!r}: this harness is for tag v2.2.3")
        text = text.replace(old, new)
    (suite / "backend_tests.py").write_text(text)
    return suite


def seed_fixtures(url: str, work: Path) -> None:
    """What the public catalog and public kernels gave the suite: one public dataset, one run kernel."""
    import kagglesdk.kaggle_env as kaggle_env

    kaggle_env._env_to_endpoint[kaggle_env.KaggleEnv.PROD] = url
    os.environ.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    data = work / "fixture-dataset"
    data.mkdir()
    (data / "data.csv").write_text("id, fruit\n1, apple\n2, banana\n")
    (data / "dataset-metadata.json").write_text(json.dumps(
        {"id": f"{USER}/kaggleapi-fixture", "title": "kaggleapi-fixture", "licenses": [{"name": "CC0-1.0"}]}))
    created = api.dataset_create_new(str(data), public=True, quiet=True)
    if created.status != "ok":
        raise SystemExit(f"could not create the fixture dataset: {created.error}")
    kernel = work / "fixture-kernel"
    kernel.mkdir()
    (kernel / "fixture.py").write_text("open('result.csv', 'w').write('id,value\\n1,2\\n')\n")
    (kernel / "kernel-metadata.json").write_text(json.dumps({
        "id": f"{USER}/kaggleapi-fixture-kernel", "title": "kaggleapi-fixture-kernel", "code_file": "fixture.py",
        "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": False,
        "enable_internet": False, "dataset_sources": [], "kernel_sources": [], "competition_sources": []}))
    api.kernels_push(str(kernel))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if api.kernels_status(f"{USER}/kaggleapi-fixture-kernel").status.name == "COMPLETE":
                files, _ = api.kernels_output(f"{USER}/kaggleapi-fixture-kernel", str(work / "probe"))
                if any(name.endswith("result.csv") for name in files):
                    return
        except Exception:  # noqa: BLE001 - the windows after a push: keep looking
            pass
        time.sleep(1)
    raise SystemExit("the fixture kernel did not complete with its output")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kaggle-cli", type=Path, required=True, help="a kaggle-cli checkout (tag v2.2.3)")
    parser.add_argument("--slow", action="store_true", help="keep the suite's own 30 s and 10 s sleeps")
    parser.add_argument("--kind", action="store_true", help="run the emulator with realism off")
    args = parser.parse_args()
    from kaggle_runner.emulator.realism import Realism
    from kaggle_runner.emulator.server import EmulatorServer, port_free

    with tempfile.TemporaryDirectory(prefix="official-backend-") as folder:
        work = Path(folder)
        suite = prepared_suite(args.kaggle_cli.expanduser(), work, fast=not args.slow)
        port = 80 if port_free(80) else 0
        realism = Realism.off() if args.kind else None
        with EmulatorServer(work / "emulator", username=USER, key=KEY, port=port, realism=realism) as server:
            seed_fixtures(server.url, work)
            env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY,
                   "KAGGLE_CONFIG_DIR": str(work / "config"), "HOME": str(work / "home"),
                   "NO_PROXY": "127.0.0.1,localhost"}
            (work / "config").mkdir()
            (work / "home").mkdir()
            if port != 80:
                hook = work / "hook"
                hook.mkdir()
                (hook / "sitecustomize.py").write_text(
                    "import kagglesdk.kaggle_env as e\n"
                    f"e._env_to_endpoint[e.KaggleEnv.LOCAL] = {server.url!r}\n")
                env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
            print(f"emulator at {server.url}; running the suite's kernels and datasets tests", flush=True)
            result = subprocess.run([sys.executable, "backend_tests.py", "-v", "-k", "kernels", "-k", "dataset"],
                                    cwd=suite, env=env)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
