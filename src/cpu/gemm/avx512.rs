//! The f32 matrix product on AVX-512, for CPUs that have it (the `gemm` crate multiplies
//! with AVX2 on stable Rust, half the width).
//!
//! `c[m, n] (+)= a[m, k] · b[k, n]`. `b` (a weight, or the activation of a weight
//! gradient) is packed once per product into panels of `NR` columns, zero-padded, and
//! shared by every thread; `a` is read in place when row-major, else packed by each
//! thread into `MR`-row tiles per `KC` block of `k`. Threads take disjoint blocks of
//! `c`'s rows, and every element sums its `k` terms in the same order whatever the
//! blocks: in `KC`-long runs from `k = 0`, each run summed in a register from zero and
//! then added to `c`. So the result does not depend on the thread count.

use std::arch::x86_64::*;
use std::cell::Cell;

use rayon::prelude::*;

use super::{Mat, Start};

/// Rows of `c` per register tile.
const MR: usize = 8;
/// Columns of `c` per register tile: three 16-lane vectors.
const NR: usize = 48;
/// `k` per pass over a tile: a packed panel of `b` (`KC·NR` values, 48 KiB) stays in L1/L2
/// while every row tile of a block reuses it.
const KC: usize = 256;
/// Rows of `c` per rayon task (a multiple of `MR`).
const MC: usize = 96;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

thread_local! {
    /// The packed `b` of the last product on this thread, kept so that the next product
    /// reuses its memory instead of faulting in fresh pages.
    static PACKED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The packed tiles of `a` of the last block this thread multiplied, kept for the same
    /// reason: attention multiplies thousands of small heads per step.
    static A_TILES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// A thread-local buffer with room for `len` values after its first cache-line boundary
/// (see [`line_aligned`]), taken out of `cell` (see [`matmul`] on why). It only grows: cut
/// back to each request, it would be zero-filled again whenever a larger one follows a
/// smaller. What it holds is stale, so only a buffer whose every value is written may be
/// taken.
fn take_buffer(cell: &'static std::thread::LocalKey<Cell<Vec<f32>>>, len: usize) -> Vec<f32> {
    let mut buffer = cell.take();
    if buffer.len() < len + LINE - 1 {
        buffer.resize(len + LINE - 1, 0.0);
    }
    buffer
}

/// Values per 64-byte cache line.
const LINE: usize = 16;

/// `len` values of `buffer` from its first cache-line boundary on: packed panels then
/// start lines, and each 16-value vector of them is one line (the tiles of `a` are read
/// one value at a time, so they need no such start). At the allocator's
/// 16-byte alignment every vector load would straddle two lines (measured 5-7% slower
/// with the data in L1).
fn line_aligned(buffer: &mut [f32], len: usize) -> &mut [f32] {
    let skip = (64 - buffer.as_ptr() as usize % 64) % 64 / 4;
    &mut buffer[skip..skip + len]
}

/// `c[m, n] = start + a · b` with `c` row-major at row stride `c_rs`. The caller checked
/// the shapes, that `c` holds every element and that `start` covers them.
pub fn matmul(c: &mut [f32], c_rs: usize, a: Mat<f32>, b: Mat<f32>, start: Start<f32>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let panels = n.div_ceil(NR);
    // Taken out of the thread-local, not borrowed: a nested product on this thread (rayon
    // runs other tasks while one waits) then packs into a buffer of its own.
    // Packed even when `b` is row-major: its rows lie a power-of-two-like stride apart
    // (768 B, 3 KB), so a panel read in place falls into a few of L1's sets and evicts
    // itself (measured slower in the step), while the packed panel is contiguous.
    // `pack_b` writes every value, padding included, so the buffer is not cleared first
    // (zeroing it was a pass as long as the copy).
    let mut buffer = take_buffer(&PACKED, k * panels * NR);
    let packed = line_aligned(&mut buffer, k * panels * NR);
    pack_b(packed, b, panels);
    let packed = &*packed;

    let rows_per_task = MC * c_rs;
    let task = |(block, c): (usize, &mut [f32])| {
        let rows = MC.min(m - block * MC);
        let a = Mat {
            data: &a.data[block * MC * a.rs..],
            rows,
            ..a
        };
        let start = match start {
            Start::Residual(x, bias) => Start::Residual(&x[block * MC * c_rs..], bias),
            other => other,
        };
        // SAFETY: `available()` was checked by the caller; `multiply_block` stays inside
        // `a`, `packed`, `start` and the `rows × n` block of `c` at stride `c_rs`.
        unsafe { multiply_block(c, c_rs, a, packed, n, start) }
    };
    if m > MC {
        c.par_chunks_mut(rows_per_task).enumerate().for_each(task);
    } else {
        task((0, c));
    }
    PACKED.set(buffer);
}

/// `b` `[k, n]` into `KC`-row blocks, each holding its panels one after the other: block
/// `k0` starts at `k0·panels·NR`, its panel `j` is `kb × NR` values (`kb` the block's
/// rows), column `j·NR + x` of row `k0 + r` at `r·NR + x`; columns past `n` are 0.
fn pack_b(packed: &mut [f32], b: Mat<f32>, panels: usize) {
    let n = b.cols;
    let block_len = KC * panels * NR;
    let pack_block = |(block, dst): (usize, &mut [f32])| {
        let k0 = block * KC;
        let kb = dst.len() / (panels * NR);
        if b.cs == 1 {
            // Row by row: each row of `b` is read once, front to back, as the
            // prefetchers expect; panel by panel would walk `b` at its row stride.
            for r in 0..kb {
                let src = &b.data[(k0 + r) * b.rs..][..n];
                for j in 0..panels {
                    let row = &mut dst[(j * kb + r) * NR..][..NR];
                    let src = &src[j * NR..][..NR.min(n - j * NR)];
                    // SAFETY: `matmul`'s caller checked `available()`.
                    unsafe { copy_panel_row(row.try_into().unwrap(), src) };
                }
            }
            return;
        }
        for (j, panel) in dst.chunks_exact_mut(kb * NR).enumerate() {
            let cols = NR.min(n - j * NR);
            // Columns of `b` that are contiguous (a transposed weight, a head's keys)
            // go 16 × 16 at a time through a register transpose; the ragged edges
            // and any other layout value by value.
            let (whole_rows, whole_cols) = match b.rs {
                1 => (kb / 16 * 16, cols / 16 * 16),
                _ => (0, 0),
            };
            if whole_rows > 0 && whole_cols > 0 {
                // SAFETY: `matmul`'s caller checked `available()`.
                unsafe { transpose_columns(panel, b, k0, j * NR, whole_rows, whole_cols) };
            }
            for (r, row) in panel.chunks_exact_mut(NR).enumerate() {
                let src = &b.data[(k0 + r) * b.rs + j * NR * b.cs..];
                let done = if r < whole_rows { whole_cols } else { 0 };
                for (x, v) in row[..cols].iter_mut().enumerate().skip(done) {
                    *v = src[x * b.cs];
                }
                row[cols..].fill(0.0);
            }
        }
    };
    // One block (a head's keys, a weight of k ≤ KC) is packed here: a parallel loop of
    // one task costs more than the copy.
    if packed.len() <= block_len {
        pack_block((0, packed));
    } else {
        packed
            .par_chunks_mut(block_len)
            .enumerate()
            .for_each(pack_block);
    }
}

/// Rows `0..rows` and columns `0..cols` (both multiples of 16) of one packed panel from
/// a `b` with contiguous columns (`rs = 1`): panel row `r` holds `b[k0 + r, col0 + x]`
/// at `r·NR + x`. Each 16 × 16 block is 16 column loads, [`transpose16`], 16 row stores,
/// where a value-by-value copy would load each value from another cache line.
///
/// # Safety
/// Needs AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn transpose_columns(
    panel: &mut [f32],
    b: Mat<f32>,
    k0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
) {
    for r0 in (0..rows).step_by(16) {
        for x0 in (0..cols).step_by(16) {
            let column = |i: usize| {
                let at = (col0 + x0 + i) * b.cs + k0 + r0;
                _mm512_loadu_ps(b.data[at..at + 16].as_ptr())
            };
            for (r, row) in transpose16(std::array::from_fn(column)).iter().enumerate() {
                let at = (r0 + r) * NR + x0;
                _mm512_storeu_ps(panel[at..at + 16].as_mut_ptr(), *row);
            }
        }
    }
}

/// The 16 × 16 transpose of `v` (`out[r]` lane `i` = `v[i]` lane `r`) in four rounds of
/// 16 shuffles: pairs of lanes, pairs of pairs, then the four 128-bit quarters.
#[target_feature(enable = "avx512f")]
fn transpose16(v: [__m512; 16]) -> [__m512; 16] {
    // t[2i], t[2i + 1]: rows 4q, 4q + 1 and 4q + 2, 4q + 3 of columns 2i, 2i + 1 in
    // quarter q.
    let t: [__m512; 16] = std::array::from_fn(|x| {
        let (a, b) = (v[x & !1], v[x | 1]);
        if x % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4i + j]: row 4q + j of columns 4i..4i + 4 in quarter q.
    let u: [__m512; 16] = std::array::from_fn(|x| {
        let (i, j) = (x / 4, x % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * i + j / 2]),
            _mm512_castps_pd(t[4 * i + j / 2 + 2]),
        );
        _mm512_castpd_ps(if j % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Row 4q + j is quarter q of u[j], u[4 + j], u[8 + j] and u[12 + j] side by side.
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        // Quarters 0, 1 of a then b (of c then d), and quarters 2, 3.
        let (ab01, cd01) = (
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0x44>(c, d),
        );
        let (ab23, cd23) = (
            _mm512_shuffle_f32x4::<0xEE>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(c, d),
        );
        out[j] = _mm512_shuffle_f32x4::<0x88>(ab01, cd01);
        out[4 + j] = _mm512_shuffle_f32x4::<0xDD>(ab01, cd01);
        out[8 + j] = _mm512_shuffle_f32x4::<0x88>(ab23, cd23);
        out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(ab23, cd23);
    }
    out
}

/// One panel row: `src` (at most `NR` values) at the front, zeros after it, as three
/// masked vector moves; a slice copy and a fill of these lengths are library calls per
/// row (attention's `[T, d]` rows are a full panel and a ragged one).
///
/// # Safety
/// Needs AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn copy_panel_row(dst: &mut [f32; NR], src: &[f32]) {
    assert!(src.len() <= NR);
    for (v, mask) in column_masks(src.len()).into_iter().enumerate() {
        // A masked load reads only the lanes in `mask`, all inside `src`; the pointer of
        // an empty vector past its end is never read.
        let values = _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add(16 * v));
        _mm512_storeu_ps(dst.as_mut_ptr().add(16 * v), values);
    }
}

/// `src` at the front of `dst`, zeros after it: a ragged tile column.
fn copy_padded(dst: &mut [f32], src: &[f32]) {
    dst[..src.len()].copy_from_slice(src);
    dst[src.len()..].fill(0.0);
}

/// One task's rows: for each `KC` block of `k`, every panel of `b` times every `MR`-row
/// tile of `a`. A row-major `a` (`cs = 1`) is read in place, `MR` rows as streams; any
/// other (the transposed gradient of a weight gradient), and a last tile of fewer than
/// `MR` rows, is packed first, so the kernel always reads `MR` rows.
///
/// # Safety
/// Needs AVX-512F. `a` must be a valid view, `packed` the whole packed `b` of `k = a.cols`
/// rows and `n` columns, and `c` (and a residual `start`) must hold `a.rows` rows of `n`
/// values at stride `c_rs`.
#[target_feature(enable = "avx512f")]
unsafe fn multiply_block(
    c: &mut [f32],
    c_rs: usize,
    a: Mat<f32>,
    packed: &[f32],
    n: usize,
    start: Start<f32>,
) {
    let (m, k) = (a.rows, a.cols);
    assert!(m > 0 && c.len() > (m - 1) * c_rs + n - 1);
    let (panels, tiles) = (n.div_ceil(NR), m.div_ceil(MR));
    let in_place = if a.cs == 1 { m / MR } else { 0 };
    // `pack_a` writes every value of the tiles it packs, padding rows included.
    let mut a_tiles = take_buffer(&A_TILES, (tiles - in_place) * MR * KC.min(k));
    for k0 in (0..k).step_by(KC) {
        let kb = KC.min(k - k0);
        let a_packed = &mut a_tiles[..(tiles - in_place) * MR * kb];
        pack_a(a_packed, a, in_place * MR, k0, kb);
        let block = &packed[k0 * panels * NR..][..kb * panels * NR];
        for (j, panel) in block.chunks_exact(kb * NR).enumerate() {
            let masks = column_masks(NR.min(n - j * NR));
            for t in 0..tiles {
                let i = t * MR;
                let packed_tile = t >= in_place;
                let tile = match packed_tile {
                    false => (a.data.as_ptr().add(i * a.rs + k0), a.rs),
                    true => (a_packed.as_ptr().add((t - in_place) * MR * kb), 1),
                };
                let at = i * c_rs + j * NR;
                let c = c.as_mut_ptr().add(at);
                let rows = MR.min(m - i);
                // Later `k` blocks add to what the first one stored.
                let start = match start {
                    _ if k0 > 0 => TileStart::Dst,
                    Start::Zero => TileStart::Zero,
                    Start::Dst => TileStart::Dst,
                    Start::Bias(bias) => TileStart::Bias(bias[j * NR..].as_ptr()),
                    Start::Residual(x, bias) => {
                        TileStart::Residual(x[at..].as_ptr(), bias[j * NR..].as_ptr())
                    }
                };
                let tile = Tile {
                    a: tile,
                    panel,
                    kb,
                    c,
                    c_rs,
                    rows,
                    masks,
                    start,
                };
                // A packed tile steps `MR` values per `k`, a row read in place one.
                match packed_tile {
                    false => tile.multiply::<1>(),
                    true => tile.multiply::<MR>(),
                }
            }
        }
    }
    A_TILES.set(a_tiles);
}

/// Rows `first..` of `a`, columns `k0..k0 + kb`, as `MR`-row tiles, each `kb × MR` with
/// the tile's `MR` values of one `k` adjacent; rows past `a.rows` are 0.
fn pack_a(dst: &mut [f32], a: Mat<f32>, first: usize, k0: usize, kb: usize) {
    if a.rs == 1 {
        pack_a_transposed(dst, a, first, k0, kb);
        return;
    }
    for (t, tile) in dst.chunks_exact_mut(MR * kb).enumerate() {
        let row0 = first + t * MR;
        let rows = MR.min(a.rows - row0);
        let src = &a.data[row0 * a.rs + k0 * a.cs..];
        for (r, values) in tile.chunks_exact_mut(MR).enumerate() {
            for (i, v) in values.iter_mut().enumerate() {
                *v = if i < rows {
                    src[i * a.rs + r * a.cs]
                } else {
                    0.0
                };
            }
        }
    }
}

/// [`pack_a`] for an `a` whose columns are contiguous (`rs = 1`: the transposed gradient
/// of a weight gradient). Column `k` of the block's rows is one contiguous run of the
/// gradient's row `k`, so the block is read run by run, each run scattered to every
/// tile; the run `AHEAD` columns on is prefetched, since runs lie a whole gradient row
/// apart (2.3 KB for qkv) and the hardware prefetchers do not follow that stride.
fn pack_a_transposed(dst: &mut [f32], a: Mat<f32>, first: usize, k0: usize, kb: usize) {
    const AHEAD: usize = 16;
    let rows = a.rows - first;
    let tiles = dst.len() / (MR * kb);
    for r in 0..kb {
        if k0 + r + AHEAD < a.cols {
            let ahead = a.data[first + (k0 + r + AHEAD) * a.cs..].as_ptr();
            for line in (0..rows).step_by(16) {
                // SAFETY: a prefetch is a hint; it never faults, even past the slice.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) }
            }
        }
        let run = &a.data[first + (k0 + r) * a.cs..];
        for t in 0..tiles {
            let dst: &mut [f32; MR] = (&mut dst[(t * kb + r) * MR..][..MR]).try_into().unwrap();
            let have = MR.min(rows.saturating_sub(t * MR));
            if have == MR {
                *dst = run[t * MR..][..MR].try_into().unwrap();
            } else {
                copy_padded(dst, &run[t * MR..][..have]);
            }
        }
    }
}

/// What a tile's sums are added to: [`Start`] at the tile, or `c` itself after the first
/// `k` block. `Bias` points at the tile's first column of the bias; `Residual` at the
/// tile's first value of `x` (laid out as `c`) and at the bias.
#[derive(Clone, Copy)]
enum TileStart {
    Zero,
    Dst,
    Bias(*const f32),
    Residual(*const f32, *const f32),
}

/// Which lanes of a tile's three vectors hold columns of `c`.
fn column_masks(cols: usize) -> [__mmask16; 3] {
    std::array::from_fn(|v| {
        let lanes = cols.saturating_sub(16 * v).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    })
}

/// One register tile's work: `c[rows ≤ MR, 16·V]` (+)= `a` `[MR, kb]` · `panel` `[kb, 16·V]`
/// (the first `V` vectors of each `NR`-wide panel row), only the lanes in `masks`. `a` is
/// `(pointer, row stride)`; its stride along `k` is the kernel's constant `CS`.
struct Tile<'p> {
    a: (*const f32, usize),
    panel: &'p [f32],
    kb: usize,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    masks: [__mmask16; 3],
    start: TileStart,
}

impl Tile<'_> {
    /// The kernel for this tile's vector count. `CS`, `a`'s stride along `k`, is a
    /// constant: as a run-time value it costs address arithmetic on every `k` step, on the
    /// ports the multiply-adds need (measured 25% slower with the tile in L1).
    ///
    /// # Safety
    /// As [`multiply_tile`].
    #[target_feature(enable = "avx512f")]
    unsafe fn multiply<const CS: usize>(self) {
        // A ragged last panel computes only the vectors it has: T = 50 attention
        // products are two panels, 48 columns and 2.
        match self.masks.iter().filter(|&&mask| mask != 0).count() {
            1 => multiply_tile::<1, CS>(self),
            2 => multiply_tile::<2, CS>(self),
            _ => multiply_tile::<3, CS>(self),
        }
    }
}

/// One register tile: the `k` terms summed in order from zero, then added to `start` and
/// stored into `c`. `c`'s lines are prefetched for writing first: a product's output is
/// usually not in cache (qkv's is 15 MB at vit_tiny batch 32), and fetching it while the
/// tile computes measured 10-40% faster than waiting for it at the stores.
///
/// # Safety
/// Needs AVX-512F; `a` must cover `MR` rows of `kb` values at `k` stride `CS`, and `c` hold
/// `rows` rows at stride `c_rs` of the masked columns.
#[target_feature(enable = "avx512f")]
unsafe fn multiply_tile<const V: usize, const CS: usize>(
    Tile {
        a: (a, a_rs),
        panel,
        kb,
        c,
        c_rs,
        rows,
        masks,
        start,
    }: Tile,
) {
    for i in 0..rows {
        for (v, &mask) in masks.iter().take(V).enumerate() {
            if mask != 0 {
                _mm_prefetch::<_MM_HINT_ET0>(c.add(i * c_rs + 16 * v).cast());
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    let a_rows: [*const f32; MR] = std::array::from_fn(|i| a.add(i * a_rs));
    for (r, b) in panel.chunks_exact(NR).take(kb).enumerate() {
        let b: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.as_ptr().add(16 * v)));
        for (acc, row) in acc.iter_mut().zip(&a_rows) {
            let a = _mm512_set1_ps(*row.add(r * CS));
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
    }
    for (i, acc) in acc.iter().take(rows).enumerate() {
        let row = c.add(i * c_rs);
        for (v, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
            if mask == 0 {
                continue;
            }
            let dst = row.add(16 * v);
            let load = |p: *const f32| _mm512_maskz_loadu_ps(mask, p.add(16 * v));
            let sum = match start {
                TileStart::Zero => acc,
                TileStart::Dst => _mm512_add_ps(load(row), acc),
                TileStart::Bias(bias) => _mm512_add_ps(load(bias), acc),
                TileStart::Residual(x, bias) => {
                    let x = load(x.add(i * c_rs));
                    _mm512_add_ps(_mm512_add_ps(x, load(bias)), acc)
                }
            };
            _mm512_mask_storeu_ps(dst, mask, sum);
        }
    }
}
