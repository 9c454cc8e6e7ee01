"""Which attention the batching engine runs on a GPU, and the flash kernels an image pre-fetches.

transformers' continuous batching is fastest with a flash implementation: no dense mask across
the requests of a step, and CUDA graphs and its fast decode path on. `sdpa` runs anywhere but
builds that mask and turns both off. Where flash comes from:

- the `flash-attn` package (FA2) or `flash-attn-3`, when installed;
- a kernel from Hugging Face's `kernels-community` built for this torch and CUDA, through the
  `kernels` package (the `gpu` extra). The Docker image pre-fetches it at build time
  (`python -m bot.llm.attention prefetch DIR`) and names it in LOCAL_KERNELS, so a start never
  downloads code.

LLM_ATTENTION (an extension) says what the engine may use on CUDA: `auto` (the default) takes
flash when it is on this machine already (a package, or a kernel LOCAL_KERNELS names); `flash`
also lets `kernels` fetch the kernel from the Hub at start (the operator opts in to downloaded
code); `sdpa` never uses flash. When flash is wanted and cannot be had, the engine runs sdpa
and one warning line says why and what to do. On a CPU the engine runs sdpa one request at a
time within each step (bot/llm/cpu_attention.py), whatever LLM_ATTENTION says.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

AttentionMode = Literal["auto", "flash", "sdpa"]

# transformers' names, newest first, and the `kernels-community` repositories that implement
# them (transformers.modeling_flash_attention_utils.FLASH_ATTN_KERNEL_FALLBACK).
FLASH = ("flash_attention_3", "flash_attention_2")
KERNEL_REPOS = {
    "flash_attention_3": "kernels-community/flash-attn3",
    "flash_attention_2": "kernels-community/flash-attn2",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    implementation: str  # what transformers is told: flash_attention_3 or flash_attention_2
    source: str  # where it comes from, for the log line


def local_kernels(env: Mapping[str, str]) -> dict[str, Path]:
    """LOCAL_KERNELS (`repo=path:repo=path`, as the `kernels` package reads it): existing paths."""
    found: dict[str, Path] = {}
    for entry in env.get("LOCAL_KERNELS", "").split(":"):
        repo, _, path = entry.partition("=")
        if repo and path and Path(path).is_dir():
            found[repo] = Path(path)
    return found


def candidates(
    mode: AttentionMode, *, packages: set[str], kernels: bool, local: Mapping[str, Path]
) -> list[Candidate]:
    """The flash implementations to try, best first. `packages`: the flash distributions
    installed (`flash_attn`, `flash_attn_interface`); `kernels`: whether `kernels` is installed."""
    if mode == "sdpa":
        return []
    found: list[Candidate] = []
    for implementation, package in zip(FLASH, ("flash_attn_interface", "flash_attn"), strict=True):
        repo = KERNEL_REPOS[implementation]
        if package in packages:
            found.append(Candidate(implementation, f"the {package} package"))
        elif kernels and repo in local:
            found.append(Candidate(implementation, f"{repo}, pre-fetched in {local[repo]}"))
        elif kernels and mode == "flash":
            found.append(Candidate(implementation, f"{repo}, from the Hugging Face Hub"))
    return found


def choose(model: Any, device: str, mode: AttentionMode) -> str:
    """Set the model's attention for continuous batching on `device`; returns what it runs.

    On a CPU, sdpa runs per request (bot.llm.cpu_attention). On CUDA, tries each flash candidate
    and keeps the first that loads; when none does (or none is installed), one warning line says
    so and the model keeps its attention.
    """
    current = str(model.config._attn_implementation)
    if not device.startswith("cuda"):
        if current != "sdpa":
            return current
        from bot.llm.cpu_attention import use_per_request_attention

        use_per_request_attention(model)
        return "sdpa, per request"
    if mode == "sdpa":
        return current
    packages = {p for p in ("flash_attn", "flash_attn_interface") if _installed(p)}
    found = candidates(
        mode, packages=packages, kernels=_installed("kernels"), local=local_kernels(os.environ)
    )
    failures: list[str] = []
    for candidate in found:
        try:
            model.set_attn_implementation(candidate.implementation)
        except Exception as exc:  # a missing build for this GPU, torch or CUDA; no network
            failures.append(f"{candidate.source}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        logger.info("attention: %s from %s", candidate.implementation, candidate.source)
        return candidate.implementation
    why = "; ".join(failures) or "no flash-attn package and no pre-fetched kernel"
    logger.warning(
        "no flash attention (%s): the batching engine runs %s, with a mask across requests and "
        "no CUDA graphs, which is slower; install the `gpu` extra and set LLM_ATTENTION=flash, "
        "or use the Docker image, which pre-fetches the kernel",
        why,
        current,
    )
    return current


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def prefetch(target: Path) -> list[str]:
    """Download each flash kernel built for this torch and CUDA into `target/<name>` (image
    build time); returns the LOCAL_KERNELS entries of those that exist."""
    from kernels import install_kernel
    from transformers.integrations.hub_kernels import get_attn_kernel_version

    entries = []
    for implementation in FLASH:
        repo = KERNEL_REPOS[implementation]
        try:
            variant = install_kernel(repo, version=get_attn_kernel_version(repo), backend="cuda")
        except Exception as exc:  # no build of it for this torch/CUDA: the other may have one
            print(f"{repo}: not fetched ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        # The variant lives in <snapshot>/build/<variant>; LOCAL_KERNELS wants the snapshot.
        destination = target / repo.split("/", 1)[1]
        shutil.copytree(variant.parent.parent, destination, symlinks=False, dirs_exist_ok=True)
        entries.append(f"{repo}={destination}")
        print(f"{repo}: {variant.name} -> {destination}", file=sys.stderr)
    return entries


def main(argv: list[str]) -> int:
    """`python -m bot.llm.attention prefetch DIR`: what the Docker image runs at build time."""
    if len(argv) != 2 or argv[0] != "prefetch":
        print("usage: python -m bot.llm.attention prefetch DIR", file=sys.stderr)
        return 2
    if not _installed("kernels"):
        print("the `kernels` package is not installed (the `gpu` extra)", file=sys.stderr)
        return 1
    entries = prefetch(Path(argv[1]))
    print(":".join(entries))
    return 0 if entries else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
