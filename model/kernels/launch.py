"""How the Triton kernels are launched, in plain Python (no Triton needed): the kernels' wrappers (triton_*.py)
and the TensorRT plugins (plugins/spec.py) both take their blocks, warps and precisions from here, so an engine's
plugins launch the very programs the torch ops run."""

from __future__ import annotations

CHUNK = 64   # steps per chunk of the chunked gated delta rule


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def dot_block(n: int) -> int:
    """A block over n columns that tl.dot takes: a power of two, at least 16."""
    return max(16, next_power_of_2(n))


def chunk_solve_precision(dtype: str) -> str:
    """The solve's tl.dot precision, its 64x64 triangular inverse included: about float32 (tf32x3) for float32
    models, tf32 for 16-bit ones. On an H100 (bf16, Qwen3-Next's heads, T=8192) the inverse in tf32x3 made the
    solve 2593 against 688 us (shared memory and spills) and its errors no smaller: on repeated keys, beta 1, no
    decay, the rule's output / state were 5.6e-3 / 7.0e-3 from float64 against 2.2e-3 / 1.3e-3 in tf32."""
    return "tf32x3" if dtype == "float32" else "tf32"


def chunk_operands(dtype: str, K: int, V: int) -> dict:
    """The dtypes of the chunked rule's product operands for a model of `dtype` and heads of K x V, as names (the
    products accumulate in float32 either way). BOUNDED: operands whose entries stay within a few units, the
    l2-normalised keys and queries, their decayed forms, the intra-chunk attention and (I + A)^-1 (its column j is
    what a unit write at step j leaves in the later writes, each step's state update a contraction: at most 1).
    FREE: those that carry the values and the state (v, U, S). 16-bit models take float16 for BOUNDED (tf32's 10
    mantissa bits) and their own dtype for FREE (bfloat16 keeps float32's range), as fla does; float32 models
    float32 (in tf32x3, about float32). The inverse itself is built from float32 operands (chunk_solve_precision).

    Against tf32 products of float32 operands, on an H100 (bf16, batch 1, device time, Qwen3-Next's heads,
    T=8192): the solve 846 -> 590 us (410 at its 4 warps), the scan 507 -> 291 us; errors from float64 (output /
    state) 2.4e-3 / 7.7e-4 -> 3.0e-3 / 2.9e-3.

    Only heads of K = 128 (blocks of 128; Qwen3-Next's and `small`'s) with V of 64 or more take 16-bit operands:
    checked there on the H100 against float64 (tests/test_triton_kernels.py) and run at bench.kernels' prefill
    shapes, eagerly and in CUDA graphs. The rest keep float32 operands. With 16-bit operands on the
    H100 (Triton 3.6), `tiny`'s heads (K = V = 64: the scan at four warps) made an illegal memory access at T=1,
    and heads of K = 32, V = 16 gave outputs 2.0e-2 from float64 in bfloat16 and float16 alike (the state 3.6e-4;
    the interpreter's 4.8e-4)."""
    if dtype == "float32" or dot_block(K) < 128 or dot_block(V) < 64:
        return dict(BOUNDED="float32", FREE="float32")
    return dict(BOUNDED="float16", FREE=dtype)


def chunk_solve_warps(K: int, V: int, dtype: str) -> int:
    """Warps of the solve kernel. With 16-bit operands (chunk_operands): 4 (on an H100, bf16, batch 1, Qwen3-Next's
    heads, T=8192: 410 against 590 us at 8, two programs an SM). With float32 operands: 8 at K = 128, where 4
    spill 3 KB a thread (ptxas, sm_90; then on bf16, the whole rule 5047 -> 4038 us), 4 at K = 64."""
    return 8 if K > 64 and chunk_operands(dtype, K, V)["FREE"] == "float32" else 4


def chunk_scan_block_v(K: int, V: int) -> int:
    """Columns of V per scan program, the fastest measured on an H100 (bf16, batch 1, T=8192, float32 operands in
    tf32): 16 at K = 64 (250 against 379 us with 64 at `tiny`'s heads), 32 at K = 128 (Qwen3-Next's heads: 495 us
    against 594 with 64 and 854 with 16)."""
    return min(dot_block(V), 16 if K <= 64 else 32)


def chunk_buffer_dtype(dtype: str, K: int, V: int) -> str:
    """The dtype of the chunked rule's buffer of state-independent terms (the plugins keep one float32 buffer):
    with 16-bit operands the scan's FREE dtype (chunk_operands), else float16 for 16-bit models (the scan's tf32
    products round to as much; their entries are at most 1) and float32 for float32 ones."""
    free = chunk_operands(dtype, K, V)["FREE"]
    if free != "float32":
        return free
    return "float32" if dtype == "float32" else "float16"


def chunk_scan_launch(K: int, V: int, dtype: str, buffer_dtype: str) -> dict:
    """The serial scan's launch: columns of V per program (BV, chunk_scan_block_v), the precision of float32
    operands (PREC: tf32x3 for float32 models), warps and pipeline stages. Eight warps at K = 128, where four spill
    the scan's 128-row operands (`small`'s heads, T=8192, tf32 products then: 444 against 577 us), four at K = 64;
    two stages, one for a 16-bit model's float32 buffer (the plugins' one buffer: two stages of its float32
    operands did not fit shared memory).

    With 16-bit operands, four warps and three stages at 16 columns timed faster in a sweep on an H100 (bf16, batch
    1: `small`'s heads at T=2048 46.6 against 72.4 us, `tiny`'s 31.3 against 38.4; Qwen3-Next's at T=8192 347
    against 292) but made an illegal memory access on a GPU test's shape (bf16, K = 128, T = 64; Triton 3.6), so
    they are not used."""
    float32_buffer_of_16bit = dtype != "float32" and buffer_dtype == "float32"
    return dict(BV=chunk_scan_block_v(K, V), PREC="tf32x3" if dtype == "float32" else "tf32",
                num_warps=4 if K <= 64 else 8, num_stages=1 if float32_buffer_of_16bit else 2)


def training_scan_launch(K: int, V: int, dtype: str, buffer_dtype: str, programs: int, writes_dtype: str) -> dict:
    """The training scan's launch (triton_chunk_train.py, both directions) for `programs` batch rows x value heads:
    prefill's (chunk_scan_launch), or where those alone make about a program per H100 SM and the products take
    16-bit operands at K = 128, the whole of V per program at eight warps, two stages (one for float32 writes,
    whose two stages ask for more shared memory than an H100 has): the terms are then read once rather than once
    per block of columns. On an H100 (bf16, `small`'s heads, 8 x 16 programs, 2048 steps, bf16 writes) forward /
    backward took 357 / 379 us so, against 610 / 657 us at prefill's 32 columns (64 columns: 423-450 / 367-479)."""
    launch = chunk_scan_launch(K, V, dtype, buffer_dtype)
    if programs >= 128 and K == 128 and chunk_operands(dtype, K, V)["FREE"] != "float32":
        launch.update(BV=dot_block(V), num_warps=8, num_stages=1 if writes_dtype == "float32" else 2)
    return launch


def rule_backward_launch(K: int, V: int, dtype: str) -> dict:
    """The training rule's two per-chunk backward kernels (triton_chunk_train.chunk_values_backward_kernel and
    chunk_keys_backward_kernel): value columns per step of their walks (BV), warps and pipeline stages (one for
    float32 operands, whose two stages ask for more shared memory than an H100 has at K = 128)."""
    float32 = chunk_operands(dtype, K, V)["FREE"] == "float32"
    return dict(BV=min(dot_block(V), 64), num_warps=8 if K > 64 else 4, num_stages=1 if float32 else 2)

def decode_warps(K: int, V: int) -> int:
    """Warps of the fused decode step: the fastest measured on an H100 (bf16, one CUDA graph per call). 2 for a
    64 x 64 state (tiny: 3.4 us per layer at batch 1, 3.8 at 32; 4 warps 4.5, 8 warps 6.5), 4 for 128 x 128
    (Qwen3-Next heads: 7.8 us at batch 1, 62 at 32; 8 warps 12.9 and 104)."""
    return 2 if next_power_of_2(K) * next_power_of_2(V) <= 64 * 64 else 4


ATTENTION_ACCUMULATOR = 4096   # float32 elements of a program's [query rows, head dim] output: four warps' registers


def decode_attention_fits(head_dim: int) -> bool:
    """Whether the cache attention kernel takes heads of `head_dim`: at least 16 query rows (tl.dot's least) must
    fit its accumulator, so up to D = 256."""
    return 16 * dot_block(head_dim) <= ATTENTION_ACCUMULATOR


SLOT_BYTES = 32 * 1024    # one K (or V) block of the loop under PREFILL_ATTENTION_ROWS; Triton pipelines a few
PREFILL_ATTENTION_ROWS = 2048   # query rows a KV head from which the attention takes prefill's blocks


def attention_launch(rows: int, head_dim: int, element_size: int) -> dict:
    """The cache attention kernel's launch for `rows` query rows a KV head: rows a program (BM), cache slots a loop
    step (BLOCK), whether the blocks every row sees whole run in a loop of their own without masks (WHOLE_BLOCKS),
    warps and pipeline stages.

    Under PREFILL_ATTENTION_ROWS (decode steps, short prompt chunks): all rows in one program where they fit its
    accumulator, so each KV block is read once (a decode step's query heads of one KV head), else blocks of as many
    as fit (16 rows at D = 256); 64 slots a step, fewer where a block would pass SLOT_BYTES (float32 at D = 256);
    one masked loop, four warps, three stages.
    From PREFILL_ATTENTION_ROWS (a 512-token chunk at 4 query heads a KV head): blocks of 64 rows, 32 slots a step
    at D = 256 (64 below), four warps, two stages, the unmasked loop on. On an H100 (bf16, 10 calls in a CUDA
    graph, the two in one run) at `small`'s attention heads (8 query, 2 KV, D = 256), a 2,048-token chunk took 109
    against 257 us at positions 0-2047 and 416 against 1,451 us at 6144-8191; a 128-token chunk (512 rows) 20.7
    against 18.4 us at 0-127 and 28.9 against 23.9 at 384-511, hence the threshold. At `tiny`'s (D = 64, one KV
    head): 22.5 against 26.4 us for 2,048 tokens. Blocks of 128 rows (8 warps) were no faster at 2,048 tokens
    and at most 13% faster at 8,192 (single launches)."""
    D = dot_block(head_dim)
    if rows < PREFILL_ATTENTION_ROWS:
        return dict(BM=min(dot_block(rows), ATTENTION_ACCUMULATOR // D),
                    BLOCK=max(16, min(64, SLOT_BYTES // (D * element_size))), WHOLE_BLOCKS=False, num_warps=4,
                    num_stages=3)
    return dict(BM=64, BLOCK=32 if D >= 256 else 64, WHOLE_BLOCKS=True, num_warps=4, num_stages=2)


def combine_blocks(rows: int, block_rows: int, head_dim_block: int, splits: int) -> tuple[int, int, int]:
    """(ROWS, COLS, SPLITS) of a program combining the attention's splits: the query rows in use (at most 16 of the
    attention's block of them; a decode step's 4 of 16 read no padding), 64 columns of the head dim, and as many
    splits per load as keep the [SPLITS, ROWS, COLS] float32 block at 8192 elements (64 registers per thread at 4
    warps): a whole 4096-slot cache's 16 splits in one load at tiny's heads."""
    rows = min(block_rows, next_power_of_2(rows), 16)
    cols = min(head_dim_block, 64)
    return rows, cols, max(1, min(next_power_of_2(splits), 8192 // (rows * cols)))


def linear_blocks(N: int, K: int, rows: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_N, BLOCK_K, warps) of the fused linear kernel. Rows in programs of up to 8, which read each
    weight block once for all of them (with a program per row, 8 rows read it 8 times from L2, and a decode step at
    batch 8 was slower than cuBLAS's on an H100); blocks of 4 to 64 output columns, the narrowest that keep the
    programs near 1024 for one or two rows, 512 for more (eight or four per H100 SM, each streaming its own weight
    rows), and fewer where several rows would leave K blocks under 64 (128-byte rows of 16-bit weights); the [ROWS,
    BLOCK_N, BLOCK_K] float32 accumulator 4096 elements (32 registers per thread at 4 warps), or 8192 at 8 warps for
    one or two rows at the narrowest columns over a K of 2048 or more (`small`'s output projections).
    On an H100 (bf16, PDL, `small`'s 97 decode products at one row chained in one CUDA graph, 24 distinct weights
    of each) the near-1024 rule took 613 against 656 us with 512 programs and 4096 elements throughout (the LM head
    28.7 against 41.9 us, the down projection 5.97 against 6.49); at four rows it was slower (1216 against 1075 us),
    so it stops at two."""
    block_rows = min(8, next_power_of_2(rows))
    row_blocks = -(-rows // block_rows)
    wide = block_rows <= 2
    block_n = min(64, max(4, next_power_of_2(-(-N * row_blocks // (1024 if wide else 512)))))
    accumulator, warps = (8192, 8) if wide and block_n == 4 and K >= 2048 else (4096, 4)
    block_k = min(next_power_of_2(K), max(64, accumulator // (block_n * block_rows)))
    return block_rows, min(block_n, accumulator // (block_k * block_rows)), block_k, warps
