"""Compiles every Triton gather kernel in every launch setting for sm_90 (H100, H200) in float16, for one request and
for a batch of eight, and prints each one's name and shared memory; exits 1 if one needs more shared memory than a
block may take. Run without TRITON_INTERPRET (``test_kernels`` runs it in a process of its own)."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from shadow.kernels import triton_gather

HOPPER = GPUTarget("cuda", 90, 32)
SHARED = 232448  # bytes of shared memory a block may take on an H100 or H200
POINTERS = {"partials": "*fp32", "arrivals": "*i32", "index": "*i64", "first": "*i64", "heads": "*i64", "keep": "*i1",
            "last": "*i64"}  # others: float16 tensors
INTEGERS = {"kept", "unit", "in_features", "span", "requests", "out_stride", "weight_stride", "inputs_stride", "batch",
            "x_stride", "out_features", "scale_stride", "head_dim", "key_stride", "table_stride", "first_stride",
            "group_size", "query_stride"}
FLOATS = {"eps", "query_scale"}


def compile_for_hopper(kernel: triton.JITFunction, constants: dict, config: triton.Config | None = None) -> int:
    """The shared memory (bytes) ``kernel`` needs with these constants and launch setting."""
    constants = {**constants, **(config.kwargs if config else {})}
    signature = {name: "constexpr" if name in constants else "i32" if name in INTEGERS else "fp32" if name in FLOATS
                 else POINTERS.get(name, "*fp16") for name in kernel.arg_names}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=HOPPER,
                          options=options).metadata.shared


def main() -> None:
    compiled = []
    for block_b in (1, 8):
        for config in triton_gather.ROWS:
            compiled.append(("rows_into_pair", block_b, config, compile_for_hopper(
                triton_gather._rows_kernel.fn, {"HAS_BIAS": True, "PAIRED": True, "LAST_IN_MEMORY": True,
                                                "BLOCK_B": block_b}, config)))
            for name, variant in (("gated_rows", {"BY_MASK": False, "GATED": True}),
                                  ("rows_where", {"BY_MASK": True, "GATED": False})):
                compiled.append((name, block_b, config, compile_for_hopper(
                    triton_gather._batch_rows_kernel.fn, {"HAS_BIAS": True, **variant, "BLOCK_B": block_b}, config)))
        for config in triton_gather.COLUMNS:
            for name, by_nonzero in (("columns", False), ("columns_nonzero", True)):
                compiled.append((name, block_b, config, compile_for_hopper(
                    triton_gather._columns_kernel.fn, {"HAS_BIAS": True, "BY_NONZERO": by_nonzero,
                                                       "BLOCK_B": block_b}, config)))
    for name, rotary in (("attend_queries", False), ("attend_queries_rotated", True)):
        compiled.append((name, 1, None, compile_for_hopper(
            triton_gather._attend_kernel, {"LAST_IN_MEMORY": True, "ROTARY": rotary, "HAS_NORM": rotary,
                                           "BLOCK_T": triton_gather.BLOCK_POSITIONS, "BLOCK_D": 128})))
    compiled.append(("rotate_keys", 1, None, compile_for_hopper(
        triton_gather._rotate_kernel, {"LAST_IN_MEMORY": True, "HAS_NORM": True, "BLOCK_D": 64})))
    for name, block_b, config, shared in compiled:
        print(f"{name}/batch{block_b}/{'-'.join(map(str, config.kwargs.values())) if config else 'fixed'}"
              f"/{config.num_warps if config else 4}w:{shared}")
    sys.exit(int(any(shared > SHARED for *_, shared in compiled)))


if __name__ == "__main__":
    main()
