"""Rule-based TensorIR schedules for aarch64 NEON (no tuning, no measurements).

TVM 0.27's DLight (``tvm.s_tir.dlight``) has CPU rules for GEMV and reductions only; GEMM and
convolution, where nearly all the work is, are left naive (one scalar multiply-add per element,
the accumulator reloaded from memory). `TiledContraction` fills that gap for every
multiply-accumulate contraction (matmul, batch matmul, dense, conv2d, depthwise conv):

- the injective epilogue (bias, BatchNorm scale, activation) is inlined into one block that runs
  on each output tile while it is still in registers;
- the output is tiled ``rows x lanes`` (lanes: up to 16 along the contiguous output axis, four
  128-bit NEON registers; rows: up to 4, so the accumulators take 16 of the 32 vector
  registers), the accumulator tile lives in a local buffer (registers after LLVM's SROA), the
  reduction runs over the tile with one broadcast operand and one vector operand, so LLVM
  emits ``fmla v.4s`` (``sdot`` for int8 with +dotprod);
- the outer spatial loops are fused and parallelised over the phone's cores.

Then DLight's CPU ``Reduction`` rule, then `VectorizedElementwise` for whatever
is left. Every rule is guarded: a rule that fails on a function leaves it to the next rule
(logged), so a schedule problem costs speed, never correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["apply", "rules", "sdot_gemm", "SDOT_BLOCK"]

log = logging.getLogger(__name__)

MAX_LANES = 16  # 4 x float32x4 NEON registers along the contiguous axis
MAX_TILE = 64  # rows * lanes accumulators: 16 NEON registers of 32
MAX_ROWS = 8
PARALLEL_MIN = 4096  # elements below which a parallel loop costs more than it saves


def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (>= 1)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _rule_base() -> type:
    from tvm.s_tir.dlight import ScheduleRule

    return ScheduleRule


SDOT_BLOCK = "ember_sdot_gemm"
SDOT_ROWS = 4  # rows x (SDOT_COLS * 4) int32 accumulators: 16 NEON registers
SDOT_COLS = 4


def sdot_gemm(m: int, n: int, k: int) -> Any:
    """The int8 GEMM ``C[i, j] = sum_k A[i, k] * W[j, k]`` (int32 accumulation) with the
    weight packed in 4x4 blocks, ``Wp[j // 4, k // 4, j % 4, k % 4]``, so that one block (4
    output columns x 4 reduction steps) is 16 contiguous bytes: what one ``sdot`` reads."""
    from tvm import te, tirx

    def i64(v: int) -> Any:  # Relax shapes are int64: FuseTIR wants the same buffer types
        return tirx.IntImm("int64", v)

    a = te.placeholder((i64(m), i64(k)), "int8", name="A")
    w = te.placeholder((i64(n // 4), i64(k // 4), i64(4), i64(4)), "int8", name="Wp")
    ko = te.reduce_axis((i64(0), i64(k // 4)), name="ko")
    ki = te.reduce_axis((i64(0), i64(4)), name="ki")
    c = te.compute((i64(m), i64(n // 4), i64(4)), lambda i, jo, ji: te.sum(
        a[i, ko * 4 + ki].astype("int32") * w[jo, ko, ji, ki].astype("int32"), axis=[ko, ki]),
        name=SDOT_BLOCK)
    out = te.compute((i64(m), i64(n)), lambda i, j: c[i, j // 4, j % 4], name="sdot_unpack")
    return te.create_prim_func([a, w, out])


def _make_rules() -> list[Any]:
    from tvm import s_tir
    from tvm.s_tir.dlight import cpu as dl_cpu
    from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func

    base = _rule_base()

    class TiledContraction(base):  # type: ignore[misc, valid-type]
        """Register-blocked, NEON-vectorized multiply-accumulate contractions."""

        name = "tiled_contraction"

        def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reds = [b for b in infos if b.is_reduction()]
            if len(reds) != 1:
                return None
            red = reds[0]
            stmt = sch.get(red.block_rv)
            if len({r.source for r in stmt.reads} - {w.source for w in stmt.writes}) < 2:
                return None  # not a multiply-accumulate (pooling, sums: other rules)
            kinds = "".join(it.kind for it in red.iters)
            if kinds.count("S") < 2 or "R" not in kinds or set(kinds) - {"S", "R"}:
                return None
            idx = infos.index(red)
            # inline the injective epilogue chain into its last block
            after = [b.block_rv for b in infos[idx + 1:]]
            left = []
            for b in after:
                try:
                    sch.compute_inline(b)
                except Exception:  # the block writes a function output: it stays
                    left.append(b)
            epilogue = left[0] if len(left) == 1 else None
            if len(left) > 1:
                return None
            before = [b.block_rv for b in infos[:idx]]
            return self._tile(sch, red.block_rv, kinds, epilogue, before)

        def _tile(self, sch: Any, block: Any, kinds: str, epilogue: Any,
                  before: Sequence[Any]) -> Any:
            loops = sch.get_loops(block)
            if len(loops) != len(kinds):
                return None
            exts = [_extent(sch, lp) for lp in loops]
            if any(e is None for e in exts):
                return None
            s_idx = [i for i, k in enumerate(kinds) if k == "S"]
            r_idx = [i for i, k in enumerate(kinds) if k == "R"]
            # vector axis: the innermost spatial axis (the output's contiguous axis for
            # matmul/conv); a strided one would turn every vector load into a gather
            vec = s_idx[-1]
            rest = [i for i in s_idx if i != vec]
            row = max(rest, key=lambda i: (exts[i], i))
            lanes = _divisor(exts[vec], MAX_LANES)
            rows = _divisor(exts[row], max(1, min(MAX_ROWS, MAX_TILE // lanes)))
            jo, ji = sch.split(loops[vec], [None, lanes])
            io, ii = sch.split(loops[row], [None, rows])
            outer = [loops[i] for i in rest if i != row]
            red_loops = [loops[i] for i in r_idx]
            sch.reorder(*outer, io, jo, *red_loops, ii, ji)
            if epilogue is not None:
                sch.reverse_compute_at(epilogue, jo, preserve_unit_loops=True)
                sch.set_scope(block, 0, "local")
                tail = epilogue
            else:
                tail = sch.cache_write(block, 0, "local")
                sch.reverse_compute_at(tail, jo, preserve_unit_loops=True)
            # vectorize before splitting off the init: the update is still a reduction block
            sch.vectorize(ji)
            sch.unroll(ii)
            last_red = red_loops[-1]
            if (_extent(sch, last_red) or 0) <= 8 and len(red_loops) > 1:
                sch.unroll(last_red)
            fused = sch.fuse(*outer, io, jo)
            n_outer = 1
            if (_extent(sch, fused) or 0) > 1:
                sch.parallel(fused)
            init = sch.decompose_reduction(block, red_loops[0])
            for b in (init, tail):
                self._vectorize_tile(sch, b, n_outer)
            for b in before:
                _vectorize_spatial(sch, b)
            return sch

        @staticmethod
        def _vectorize_tile(sch: Any, blk: Any, n_outer: int) -> None:
            inner = sch.get_loops(blk)[n_outer:]
            if not inner:
                return
            sch.vectorize(inner[-1])
            for lp in inner[:-1]:
                sch.unroll(lp)

    class SdotGemm(base):  # type: ignore[misc, valid-type]
        """`sdot_gemm` (with its fused epilogue): a ``SDOT_ROWS x SDOT_COLS`` tile of 4-lane
        int32 accumulators kept in registers, each 4x4 step one ``sdot`` (TVM's
        ``ARM_DOT_4x4_i8_SDOT_INTRIN``); only for targets with ``+dotprod``."""

        name = "sdot_gemm"

        def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
            from tvm.s_tir.tensor_intrin.arm_cpu import ARM_DOT_4x4_i8_SDOT_INTRIN

            if "+dotprod" not in [str(f) for f in target.attrs.get("mattr", [])]:
                return None
            sch = s_tir.Schedule(func)
            try:
                block = sch.get_sblock(SDOT_BLOCK)
            except Exception:  # not an sdot GEMM
                return None
            blocks = sch.get_child_blocks(get_root_block(sch))
            idx = [sch.get(b).name_hint for b in blocks].index(SDOT_BLOCK)
            left = []
            for b in blocks[idx + 1:]:
                try:
                    sch.compute_inline(b)
                except Exception:  # writes a function output
                    left.append(b)
            if len(left) != 1:
                return None
            i, jo, ji, ko, ki = sch.get_loops(block)
            exts = [_extent(sch, lp) for lp in (i, jo)]
            if any(e is None for e in exts):
                return None
            rows = _divisor(int(exts[0]), SDOT_ROWS)  # type: ignore[arg-type]
            cols = _divisor(int(exts[1]), SDOT_COLS)  # type: ignore[arg-type]
            io, ii = sch.split(i, [None, rows])
            joo, joi = sch.split(jo, [None, cols])
            sch.reorder(io, joo, ko, ii, joi, ji, ki)
            # the tile buffer stays "global" (the intrinsic's scope): compacted to the tile
            # it is a small stack array that LLVM keeps in registers
            sch.reverse_compute_at(left[0], joo, preserve_unit_loops=True)
            fused = sch.fuse(io, joo)
            if (_extent(sch, fused) or 0) > 1:
                sch.parallel(fused)
            init = sch.decompose_reduction(block, ko)
            sch.tensorize(ji, ARM_DOT_4x4_i8_SDOT_INTRIN)
            sch.unroll(ii)
            sch.unroll(joi)
            for b in (init, left[0]):
                inner = sch.get_loops(b)[1:]
                if inner:
                    sch.vectorize(inner[-1])
                    for lp in inner[:-1]:
                        sch.unroll(lp)
            for b in blocks[:idx]:
                _vectorize_spatial(sch, b)
            return sch

    class VectorizedElementwise(base):  # type: ignore[misc, valid-type]
        """Spatial blocks: fused, vectorized along the innermost axis, parallel outside."""

        name = "vectorized_elementwise"

        def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
            sch = s_tir.Schedule(func)
            blocks = sch.get_child_blocks(get_root_block(sch))
            done = 0
            for b in blocks:
                done += int(_vectorize_spatial(sch, b))
            return sch if done else None

    # DLight's CPU GEMV rule is left out: its 256-step unroll pragmas made LLVM take minutes
    # on a batch-1 classifier head; the tiled contraction covers GEMV (rows = 1)
    return [_Guarded(SdotGemm()), _Guarded(TiledContraction()),
            _Guarded(dl_cpu.Reduction()), _Guarded(VectorizedElementwise())]


def _dtype(source: Any) -> str:
    dt = getattr(source, "dtype", None)
    if dt is None:
        dt = getattr(getattr(source, "buffer", None), "dtype", "")
    return str(dt)


def _vectorize_spatial(sch: Any, block: Any) -> bool:
    """Vectorizes a spatial block at the root; True when it did."""
    try:
        stmt = sch.get(block)
        if any(int(iv.iter_type) != 0 for iv in stmt.iter_vars):  # 0 = data parallel
            return False
        if any(_dtype(r.source) == "bool" for r in (*stmt.reads, *stmt.writes)):
            return False  # TVM 0.27 mis-vectorizes stores of bool (int8 lanes vs bool buffer)
        loops = sch.get_loops(block)
        if not loops:
            return False
        exts = [_extent(sch, lp) for lp in loops]
        if any(e is None for e in exts):
            return False
        total = 1
        for e in exts:
            total *= int(e)  # type: ignore[arg-type]
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = _divisor(total, MAX_LANES)
        if lanes < 2:
            return False
        outer, inner = sch.split(fused, [None, lanes])
        sch.vectorize(inner)
        if total >= PARALLEL_MIN and total // lanes > 1:
            sch.parallel(outer)
        return True
    except Exception as e:  # an unvectorizable block keeps its loops
        log.debug("elementwise vectorize skipped: %s", e)
        return False


class _Guarded:
    """Runs a rule; an exception inside it means 'not applicable' (logged), not a failure."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule
        self.name = getattr(rule, "name", type(rule).__name__)
        self.applied: list[str] = []

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as e:  # TVM schedule primitives raise on unsupported structures
            log.debug("schedule rule %s not applicable: %s", self.name,
                      str(e).strip().splitlines()[-1:] or e)
            return None

    def is_target_available(self, target: Any) -> bool:
        return True


def rules() -> list[Any]:
    return _make_rules()


def apply(mod: Any, target: Any, report: dict[str, str] | None = None) -> Any:
    """Schedules every unscheduled PrimFunc of ``mod``; ``report`` gets func name -> rule."""
    from tvm import tirx

    rs = rules()
    out = mod
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        chosen = "none"
        for r in rs:
            sch = r.apply(func, target, False)
            if sch is None:
                continue
            if isinstance(sch, list):
                sch = sch[0]
            out[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            chosen = r.name
            break
        if report is not None:
            report[gv.name_hint] = chosen
    return out
