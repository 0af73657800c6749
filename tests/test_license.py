"""The license a user or a packager reads: Apache-2.0 (as Flower and pfl-research), in the file and the metadata."""

import importlib.metadata

import tomllib
from helpers import ROOT


def test_the_license_file_and_the_package_metadata_say_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "Copyright 2026 The FedStream authors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (project["license"], project["license-files"]) == ("Apache-2.0", ["LICENSE"])
    metadata = importlib.metadata.metadata("fedstream")  # as built from it
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
