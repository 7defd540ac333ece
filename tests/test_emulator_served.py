"""Each method the emulator serves beyond what kaggle-runner calls, through the official client's own commands:
what a user runs with the `kaggle` CLI beside kaggle-runner, against a --local run's kernels and datasets.

The client's integration suite (kaggle-cli tests/backend) passes against the emulator too; benchmarks/
official_backend_tests.py runs it from a kaggle-cli checkout (docs/emulator.md, "Served").
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import requests

from kaggle_runner.emulator.clock import ManualClock
from kaggle_runner.emulator.server import EmulatorServer
from tests.emulator_helpers import KEY, USER, eventually, official_client, wait_for, write_dataset, write_kernel


@pytest.fixture
def emulator(tmp_path):
    with EmulatorServer(tmp_path / "emu", username=USER, key=KEY, clock=ManualClock()) as server:
        yield server


@pytest.fixture
def api(emulator, monkeypatch):
    return official_client(emulator.url, monkeypatch, clock=emulator.clock)


@pytest.fixture
def dataset(api, emulator, tmp_path):
    """A public dataset of two files, past the windows after its creation."""
    folder = write_dataset(tmp_path / "ds", "fruit-data", {"data.csv": b"id,fruit\n1,apple\n", "more.txt": b"x" * 5},
                           title="Fruit Data")
    assert api.dataset_create_new(str(folder), public=True, quiet=True).status == "ok"
    emulator.clock.advance(emulator.backend.realism.dataset_404_window + emulator.backend.realism.pin_window)
    return f"{USER}/fruit-data"


def test_datasets_list_mine_user_and_search(api, dataset, tmp_path):
    private = write_dataset(tmp_path / "private", "secret-data", {"a.txt": b"a"}, title="Secret Data")
    assert api.dataset_create_new(str(private), quiet=True).status == "ok"
    mine = [d.ref for d in api.dataset_list(mine=True)]
    assert mine == [f"{USER}/secret-data", dataset]  # newest first, private ones to their owner
    assert [d.ref for d in api.dataset_list()] == [dataset]  # the public listing
    assert [d.ref for d in api.dataset_list(user=USER, search="fruit")] == [dataset]
    listed = api.dataset_list(mine=True, search="fruit")[0]
    assert listed.title == "Fruit Data" and listed.total_bytes == 22 and listed.last_updated is not None


def test_dataset_metadata_round_trips_through_the_file_the_client_writes(api, dataset, tmp_path):
    path = api.dataset_metadata(dataset, str(tmp_path / "meta"))
    written = json.loads(Path(path).read_text())
    assert written["info"]["title"] == "Fruit Data" and written["info"]["licenses"] == [{"name": "CC0-1.0"}]
    written["info"].update(title="Fruit Data Renamed", subtitle="Apples and more", keywords=["food"])
    Path(path).write_text(json.dumps(written))
    api.dataset_metadata_update(dataset, str(tmp_path / "meta"))  # errors would exit(1)
    again = json.loads(Path(api.dataset_metadata(dataset, str(tmp_path / "again"))).read_text())["info"]
    assert (again["title"], again["subtitle"], again["keywords"]) == ("Fruit Data Renamed", "Apples and more",
                                                                       ["food"])


def test_dataset_files_and_downloads_of_one_file_and_of_a_version(api, emulator, dataset, tmp_path):
    files = api.dataset_list_files(dataset).files
    assert sorted(f.name for f in files) == ["data.csv", "more.txt"]
    assert all(f.creation_date is not None for f in files)
    api.dataset_download_file(dataset, "data.csv", str(tmp_path / "one"), quiet=True)
    assert (tmp_path / "one/data.csv").read_bytes() == b"id,fruit\n1,apple\n"
    api.dataset_download_files(f"{dataset}/1", str(tmp_path / "all"), quiet=True)
    with zipfile.ZipFile(tmp_path / "all/fruit-data.zip") as packed:
        assert sorted(packed.namelist()) == ["data.csv", "more.txt"]
    api.dataset_download_cli(dataset, file_name="more.txt", path=str(tmp_path / "cli"))  # asks the metadata first
    assert (tmp_path / "cli/more.txt").read_bytes() == b"xxxxx"
    with pytest.raises(requests.HTTPError):
        api.dataset_download_file(dataset, "missing.csv", str(tmp_path / "none"), quiet=True)


def test_a_download_url_is_signed_and_expires(api, emulator, dataset):
    url = f"{emulator.url}/api/v1/datasets.DatasetApiService/DownloadDataset"
    answer = requests.post(url, json={"ownerSlug": USER, "datasetSlug": "fruit-data", "fileName": "data.csv"},
                           auth=(USER, KEY), allow_redirects=False, timeout=10)
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert requests.get(location, timeout=10).content == b"id,fruit\n1,apple\n"  # no credentials needed
    assert requests.get(location.replace("signature=", "signature=0"), timeout=10).status_code == 403
    emulator.clock.advance(2 * 3600)
    assert requests.get(location, timeout=10).status_code == 403


def test_a_deleted_dataset_is_gone_and_its_title_stays_taken(api, emulator, dataset, tmp_path):
    assert api.dataset_delete(None, "fruit-data", no_confirm=True)
    for gone in (lambda: api.dataset_list_files(dataset), lambda: api.dataset_status(dataset)):
        with pytest.raises(requests.HTTPError) as error:
            gone()
        assert error.value.response.status_code == 404
    assert api.dataset_list(mine=True) == []
    again = write_dataset(tmp_path / "again", "fruit-data-2", {"a.txt": b"a"}, title="Fruit Data")
    refused = api.dataset_create_new(str(again), quiet=True)
    assert refused.status == "error" and "already in use" in refused.error  # kaggle-cli #243


def test_kernels_list_files_and_delete(api, emulator, tmp_path):
    code = "import pathlib, time\nwhile not pathlib.Path('go').exists():\n    time.sleep(0.05)\n"
    api.kernels_push(str(write_kernel(tmp_path / "k", code, enable_gpu=False)))
    version = emulator.backend.get_version(USER, "hello-kernel", "v1")[1]
    eventually(lambda: version.started_at, what="the version's start")
    listed = api.kernels_list(user=USER)
    assert [k.ref for k in listed] == [f"{USER}/hello-kernel"] and listed[0].last_run_time is not None
    assert [k.ref for k in api.kernels_list(mine=True, search="hello")] == [f"{USER}/hello-kernel"]
    files = api.kernels_list_files(f"{USER}/hello-kernel").files
    assert [(f.name, f.size) for f in files] == [("train.py", len(code))] and files[0].creation_date
    api.kernels_delete(f"{USER}/hello-kernel", no_confirm=True)  # while its version runs: it is stopped
    with pytest.raises(ValueError, match="Permission 'kernels.get' was denied"):  # as one never pushed
        api.kernels_status(f"{USER}/hello-kernel")
    assert api.kernels_list(user=USER) == []
    assert not emulator.backend.kernel_dir(USER, "hello-kernel", 1).exists()
    api.kernels_push(str(tmp_path / "k"))  # the slug can be used again
    (emulator.backend.kernel_dir(USER, "hello-kernel", 1) / "working/go").touch()
    assert wait_for(api, f"{USER}/hello-kernel") == "COMPLETE"


def test_only_the_owner_deletes(api, emulator, monkeypatch):
    other = official_client(emulator.url, monkeypatch, username="mallory", key="wrong")
    with pytest.raises((requests.HTTPError, ValueError)):
        other.kernels_delete(f"{USER}/hello-kernel", no_confirm=True)
