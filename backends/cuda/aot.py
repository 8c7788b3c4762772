"""Ahead-of-time Triton builds: cubin + PTX per kernel specialization and GPU architecture.

`build_kernels(specs, archs, out_dir)` compiles every `KernelSpec` for every architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; Triton's bundled
``ptxas`` makes the cubins, so no GPU (and no CUDA toolkit) is needed. The builds run in a
child process (``python -m ember.backends.cuda.aot``) so they never see ``TRITON_INTERPRET``
(the interpreter replaces ``triton.jit`` functions) and leave the caller's Triton state alone.

Integer arguments are compiled unspecialized (no ``== 1`` or divisibility-by-16 assumptions),
so one cubin serves every runtime size; pointer alignment is not assumed either.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember.errors import CompilerError

from .launch import KernelSpec

__all__ = ["build_kernels", "DEFAULT_ARCHS", "ptxas_path"]

log = logging.getLogger(__name__)

DEFAULT_ARCHS = (80, 90)


def ptxas_path() -> str | None:
    """The ptxas Triton compiles with (bundled in the wheel), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(90).path)
    except Exception:  # noqa: BLE001  (absent toolchain: reported by the caller)
        return None


def _compile_one(spec: KernelSpec, arch: int, out: Path) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import KERNELS

    fn = KERNELS[spec.kernel]
    sig: dict[str, str] = dict(spec.signature)
    cst = dict(spec.constexprs)
    full = {n: (sig[n] if n in sig else "constexpr") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=full, constexprs=cst)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    stem = f"{spec.kernel}_{src.hash()[:12]}_sm{arch}"
    meta = k.metadata._asdict()
    meta["target"] = {"backend": "cuda", "arch": arch, "warp_size": 32}
    files = {"cubin": f"{stem}.cubin", "ptx": f"{stem}.ptx", "json": f"{stem}.json"}
    (out / files["cubin"]).write_bytes(k.asm["cubin"])
    (out / files["ptx"]).write_text(k.asm["ptx"])
    (out / files["json"]).write_text(json.dumps(meta, default=vars))
    return {"files": files, "name": k.metadata.name, "shared": k.metadata.shared,
            "cubin_bytes": len(k.asm["cubin"]), "seconds": round(time.perf_counter() - t0, 3)}


def _child(req: dict[str, Any]) -> dict[str, Any]:
    out = Path(req["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for d in req["specs"]:
        spec = KernelSpec.from_json(d)
        per_arch = {}
        for arch in req["archs"]:
            per_arch[f"sm_{arch}"] = _compile_one(spec, int(arch), out)
        results.append({"key": spec.key, "spec": spec.to_json(), "archs": per_arch})
    import triton

    return {"triton": triton.__version__, "kernels": results}


def build_kernels(specs: Sequence[KernelSpec], archs: Sequence[int], out_dir: str | Path,
                  timeout_s: float = 1800.0) -> dict[str, Any]:
    """Compiles ``specs`` for ``archs`` into ``out_dir``; returns the kernel manifest.

    Raises:
        CompilerError: Triton failed on a kernel (its message is kept).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not specs:
        return {"kernels": [], "archs": [f"sm_{a}" for a in archs]}
    req = {"specs": [s.to_json() for s in specs], "archs": list(archs), "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ember.backends.cuda.aot"],
                          input=json.dumps(req), capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise CompilerError(f"cuda backend: ahead-of-time Triton build failed:\n{tail}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("built %d kernel specializations x %d archs in %.1f s", len(specs), len(archs),
             time.perf_counter() - t0)
    res["archs"] = [f"sm_{a}" for a in archs]
    res["build_s"] = round(time.perf_counter() - t0, 3)
    return res


if __name__ == "__main__":
    result = _child(json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(result) + "\n")
