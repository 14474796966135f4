"""Run the engine's Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Triton 3.6's interpreter needs three fixes to compute what the GPU computes; each is patched for
the duration of one test only:
- float casts (`_convert_float`) truncate to bf16 and round FP8 without carrying into the exponent
  (124.3 -> 64 instead of 128): replaced by torch's round-to-nearest-even casts;
- `tl.dot` on bf16 operands multiplies their raw 16-bit patterns (bf16 is stored as uint16):
  bf16 operands are upcast to fp32 first (exact);
- `int()` of a scalar tensor (loop bounds, `range(0, K, BLOCK)`) fails under numpy >= 2.4, which
  refuses int() of a one-element 1-d array: `.item()` first.
And when `triton.language` was imported before TRITON_INTERPRET was set, its library functions
(tl.max, tl.sum, ...) are compiled-mode JIT functions that refuse to be called: they are run
through the interpreter instead, with its patches of triton.language undone after each call
(Triton's own device-function path leaves them in place, which breaks later compilation).

`compile_for_hopper` compiles a kernel for sm_90 on CPU (Triton's own ptxas, no GPU): its PTX and
its shared memory, as a launch on an H100/H200 would compile it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: the Triton kernel tests (interpreter, sm_90 compile) need it (pip install triton)",
)

_TORCH_DTYPES = {
    "fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2,
}
_BITS = {8: (np.uint8, torch.uint8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32), 64: (np.int64, torch.int64)}


def _convert_float(data, src, dst, rounding_mode):
    np_int = _BITS[src.primitive_bitwidth][0]
    values = torch.from_numpy(np.ascontiguousarray(data).view(np_int)).view(_TORCH_DTYPES[src.name])
    return values.to(_TORCH_DTYPES[dst.name]).view(_BITS[dst.primitive_bitwidth][1]).numpy()


def interpret_triton(monkeypatch, *kernel_caches) -> None:
    """Make the next Triton launches run in the (fixed) interpreter; clears the given kernel caches."""
    # Imported before TRITON_INTERPRET is set: triton.language's library functions are then always
    # compiled-mode JIT functions (run by the interpreter through the patch below), so kernels
    # compiled later in the same process still find them.
    import triton.language as tl
    from triton.runtime import interpreter, jit

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    interpreted: dict = {}

    def call_device_function(self, *args, **kwargs):
        # InterpretedFunction.__call__ patches triton.language and never restores it (later compiled
        # kernels then fail): patch for the call only, nested inside the running kernel's patch.
        if self.fn not in interpreted:
            interpreted[self.fn] = interpreter.InterpretedFunction(self.fn)
        scope = interpreter._patch_lang(self.fn)
        try:
            return interpreted[self.fn].rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    monkeypatch.setattr(jit.JITFunction, "__call__", call_device_function)
    create_dot = interpreter.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = self.cast_impl(a, tl.float32) if a.dtype.scalar == tl.bfloat16 else a
        b = self.cast_impl(b, tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)
    monkeypatch.setattr(interpreter, "_convert_float", _convert_float)
    for cache in kernel_caches:
        cache.cache_clear()


def compile_for_hopper(kernel, pointers: dict, scalars_fp32: tuple, constexprs: dict, divisible: tuple = (),
                       **options):
    """`kernel` compiled for sm_90 (a triton CompiledKernel: .asm["ptx"], .metadata.shared).

    pointers {arg: Triton type}; other non-constexpr args are i32, fp32 where named in scalars_fp32.
    With `divisible` (int args), those ints and the pointers are marked 16-divisible, as a launch
    with aligned tensors and sizes multiple of 16 specializes them: that decides vectorized loads
    and so the pipelined tiles in shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        name: "constexpr" if name in constexprs else f"*{pointers[name]}" if name.endswith("_ptr")
        else "fp32" if name in scalars_fp32 else "i32"
        for name in kernel.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name in divisible or (name.endswith("_ptr") and name not in constexprs)}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs if divisible else None)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
