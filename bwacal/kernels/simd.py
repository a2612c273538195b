"""Sixteen-float vectors for numba kernels: a value type and five intrinsics that emit LLVM vector IR.

numba's loop vectoriser keeps a kernel's running sums in memory; a tile of sums held in registers
across a whole reduction (what a GEMM micro-kernel does) has to be written with explicit vectors.
``f32x16`` is an LLVM ``<16 x float>`` (one AVX-512 register, two AVX2 ones); a local variable of
this type lives in a register. Only float32 arrays may be passed to ``vload``/``vstore``.

- ``vzero()``: all zeros; ``vbcast(x)``: x in every lane.
- ``vload(a, i)``: ``a[i:i+16]`` of a 1-D float32 array (unaligned; no bounds check: the caller
  guarantees ``i + 16 <= a.size``).
- ``vstore(a, i, v)``: ``a[i:i+16] = v``, same contract.
- ``vfma(a, b, c)``: ``a * b + c`` lane by lane, one rounding (``llvm.fma``).
- ``vadd(a, b)``: ``a + b``; ``vclip(v, lo, hi)``: ``lo`` where ``v < lo``, ``hi`` where ``v > hi``,
  else ``v`` (selects, as the scalar kernels clip: NaN passes through).
- ``vmask(v, m, lo, hi)``: ``v`` where ``lo < m < hi``, else 0 (0 where ``m`` is NaN): a gradient
  through a Relu/Clip whose output was ``m``.
- ``sclip(x, lo, hi)`` and ``smask(x, m, lo, hi)``: the same on float32 scalars, as selects. numba
  writes ``lo if x < lo else x`` as a branch, which a Relu's random signs mispredict half the time
  (the Winograd output transform of a 128-channel 28x28 layer: 4.4 ms clipped, 1.0 ms unclipped).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

LANES = 16
_VT = ir.VectorType(ir.FloatType(), LANES)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VT)


def _check_array(arr, what):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.float32):
        raise TypingError(f"{what} takes a 1-D float32 array, got {arr}")


def _pointer(context, builder, aryty, ary_value, index):
    ary = context.make_array(aryty)(context, builder, ary_value)
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False)
    return builder.bitcast(ptr, ir.PointerType(_VT))


@intrinsic
def vload(typingctx, arr, index):
    _check_array(arr, "vload")

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)

    return f32x16(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    _check_array(arr, "vstore")

    def codegen(context, builder, sig, args):
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VT, [0.0] * LANES)

    return f32x16(), codegen


def _splat(context, builder, value, ty):
    """The scalar ``value`` of numba type ``ty`` as float32 in every lane."""
    value = context.cast(builder, value, ty, types.float32)
    v = builder.insert_element(ir.Constant(_VT, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
    return builder.shuffle_vector(v, ir.Constant(_VT, ir.Undefined), mask)


@intrinsic
def vbcast(typingctx, x):
    def codegen(context, builder, sig, args):
        return _splat(context, builder, args[0], sig.args[0])

    return f32x16(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VT, [_VT] * 3), "llvm.fma.v16f32")
        return builder.call(fn, args)

    return f32x16(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def vclip(typingctx, v, lo, hi):
    def codegen(context, builder, sig, args):
        out = args[0]
        for k, op in ((1, "<"), (2, ">")):
            bound = _splat(context, builder, args[k], sig.args[k])
            out = builder.select(builder.fcmp_ordered(op, out, bound), bound, out)
        return out

    return f32x16(v, lo, hi), codegen


@intrinsic
def vmask(typingctx, v, m, lo, hi):
    def codegen(context, builder, sig, args):
        m = args[1]
        above = builder.fcmp_ordered(">", m, _splat(context, builder, args[2], sig.args[2]))
        below = builder.fcmp_ordered("<", m, _splat(context, builder, args[3], sig.args[3]))
        return builder.select(builder.and_(above, below), args[0], ir.Constant(_VT, [0.0] * LANES))

    return f32x16(v, m, lo, hi), codegen


@intrinsic
def sclip(typingctx, x, lo, hi):
    def codegen(context, builder, sig, args):
        out = context.cast(builder, args[0], sig.args[0], types.float32)
        for k, op in ((1, "<"), (2, ">")):
            bound = context.cast(builder, args[k], sig.args[k], types.float32)
            out = builder.select(builder.fcmp_ordered(op, out, bound), bound, out)
        return out

    return types.float32(x, lo, hi), codegen


@intrinsic
def smask(typingctx, x, m, lo, hi):
    def codegen(context, builder, sig, args):
        m = context.cast(builder, args[1], sig.args[1], types.float32)
        above = builder.fcmp_ordered(">", m, context.cast(builder, args[2], sig.args[2], types.float32))
        below = builder.fcmp_ordered("<", m, context.cast(builder, args[3], sig.args[3], types.float32))
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.select(builder.and_(above, below), x, ir.Constant(ir.FloatType(), 0.0))

    return types.float32(x, m, lo, hi), codegen
