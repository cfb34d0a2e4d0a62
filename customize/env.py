"""What this install is made of, and whether it is a combination known to break: `customize env`.

The report lists Python, torch (with CUDA / cuDNN and every GPU's name and memory) and the libraries the toolkit
stands on, then a verdict: every known-bad combination found, each with the command that fixes it. It is
Markdown, so it can be pasted into a bug report as it is.

Versions are read from the installed distributions' metadata (nothing is imported for them), except torch's
CUDA facts and transformers' own minimum peft version, which only the modules themselves know.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

# What the report lists, in this order: the stack first, then the optional accelerators of training.
PACKAGES = (
    "customize", "torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "huggingface_hub",
    "tokenizers", "safetensors", "numpy", "Pillow", "xformers", "bitsandbytes",
)

# transformers releases that refuse older peft releases in their adapter hooks (add_adapter, load_adapter,
# set_adapter, ...), which diffusers' load_lora_weights uses for text-encoder LoRA. Used when transformers does
# not say it itself (MIN_PEFT_VERSION in transformers.integrations.peft).
TRANSFORMERS_MIN_PEFT = (("5.24.0", "0.22.0"),)

# The install command of the combination the test suite was run with (constraints.txt in the repository).
TESTED_INSTALL = "pip install -c constraints.txt -e ."


class IncompatibleEnvironment(ValueError):
    """The installed libraries are a combination known to break; the message names the versions to install."""


@dataclass(frozen=True)
class Problem:
    what: str  # what breaks, with the versions found
    fix: str  # the command that fixes it
    fatal: bool = True  # known to break (refused at start), or only untested (reported)

    def __str__(self) -> str:
        return f"{self.what}; fix: {self.fix}"


def installed_versions(names=PACKAGES) -> dict[str, str | None]:
    """{distribution name: version, or None when it is not installed}."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _version(text: str):
    from packaging.version import Version

    return Version(text)


def transformers_min_peft(transformers_version: str | None, ask_installed: bool = True) -> str | None:
    """The oldest peft release transformers `transformers_version` accepts in its adapter hooks, or None if any.
    With `ask_installed`, the installed transformers' own MIN_PEFT_VERSION wins over the table."""
    if transformers_version is None:
        return None
    if ask_installed:
        try:
            from transformers.integrations import peft as hf_peft

            found = getattr(hf_peft, "MIN_PEFT_VERSION", None)
            if found is not None:
                return str(found)
        except Exception:  # noqa: BLE001 (an unimportable transformers: the table decides)
            pass
    needed = None
    for since, peft_version in TRANSFORMERS_MIN_PEFT:
        if _version(transformers_version) >= _version(since):
            needed = peft_version
    return needed


def problems(versions: dict[str, str | None] | None = None) -> list[Problem]:
    """Every known-bad combination among `versions` {name: version or None}; by default the installed ones,
    and then the installed transformers is asked which peft it needs."""
    installed = versions is None
    versions = installed_versions() if installed else versions
    found = []
    tf, peft = versions.get("transformers"), versions.get("peft")
    min_peft = transformers_min_peft(tf, ask_installed=installed)
    if tf and peft and min_peft and _version(peft) < _version(min_peft):
        found.append(Problem(
            f"transformers {tf} refuses peft {peft} (it needs peft >= {min_peft}), so text-encoder LoRA files "
            "cannot be loaded",
            f"pip install 'transformers<{_first_refusing(min_peft) or tf}' (or peft>={min_peft}), or the tested "
            f"set: {TESTED_INSTALL}",
        ))
    found += _outside_declared_ranges(versions)
    return found


def _first_refusing(min_peft: str) -> str | None:
    """The first transformers release known to need `min_peft`."""
    return next((since for since, needed in TRANSFORMERS_MIN_PEFT if needed == min_peft), None)


def _outside_declared_ranges(versions: dict[str, str | None]) -> list[Problem]:
    """Installed libraries outside the ranges this package declares (pyproject's dependencies)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = metadata.requires("customize") or []
    except metadata.PackageNotFoundError:
        return []
    by_name = {canonicalize_name(k): v for k, v in versions.items()}
    out = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra's requirement
        have = by_name.get(canonicalize_name(req.name))
        if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(Problem(f"{req.name} {have} is outside the range customize declares ({req.specifier}): untested",
                               f"pip install '{req.name}{req.specifier}', or the tested set: {TESTED_INSTALL}",
                               fatal=False))
    return out


def check(versions: dict[str, str | None] | None = None) -> None:
    """Raise IncompatibleEnvironment (one line) when the install is a combination known to break."""
    bad = [p for p in problems(versions) if p.fatal]
    if bad:
        raise IncompatibleEnvironment("; ".join(str(p) for p in bad))


def _torch_lines() -> list[str]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 (a broken torch install is itself what the report must show)
        return [f"- torch: cannot be imported ({type(e).__name__}: {e})"]
    lines = [f"- torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    if torch.cuda.is_available():
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        lines.append(f"- CUDA available: yes, cuDNN {cudnn or 'not available'}")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"- GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {props.major}.{props.minor}")
    else:
        lines.append("- CUDA available: no")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("- MPS (Apple GPU) available: yes")
    lines.append(f"- torch threads: {torch.get_num_threads()}")
    return lines


def report(versions: dict[str, str | None] | None = None) -> str:
    """The Markdown report `customize env` prints (of the installed libraries unless `versions` is given)."""
    found = problems(versions)
    versions = installed_versions() if versions is None else versions
    lines = [
        "## customize environment",
        "",
        f"- Python: {platform.python_version()} ({sys.executable})",
        f"- platform: {platform.platform()}",
    ]
    lines += _torch_lines()
    lines += [f"- {name}: {versions.get(name) or 'not installed'}" for name in PACKAGES if name != "torch"]
    lines += ["", "### verdict", ""]
    if found:
        lines += [f"- {'PROBLEM' if p.fatal else 'warning'}: {p}" for p in found]
    else:
        lines.append("- no known-bad combination found")
    return "\n".join(lines)
