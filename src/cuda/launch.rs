//! One thin typed launcher per kernel. Each checks every buffer it touches against the
//! launch's extent, converts sizes to the kernel's integer types, and picks the grid.
//! Launchers of two-pass reductions run both passes.

use anyhow::{bail, Result};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::device::DevPtr;
use super::kernels::Kernels;
use super::pixels::{PixelSource, PixelValue};
use super::step::{HYPER_LEN, STATE_LEN};
use super::storage::Storage;
use crate::config::ModelConfig;

pub(super) const THREADS: u32 = 256;
/// Threads of the one-block-per-row kernels (rows are 3p² or D values).
pub(super) const ROW_THREADS: u32 = 128;
/// Values each thread of the streaming kernels moves at once (`PACK` in kernels/common.cuh).
const PACK: usize = 8;
/// Most threads in a block of the pack kernels (`sum_row_groups` in kernels/common.cuh
/// stages this many packs).
const PACK_THREADS: usize = 256;
/// Largest row the LayerNorm kernels take: one pack per thread of one block.
const MAX_LAYERNORM_WIDTH: usize = PACK * PACK_THREADS;
/// Most chunks of the two-pass column reductions: at vit_base size 512 chunks of 100 rows
/// give 4-8 blocks per SM, while the partials (2% of the traffic) stay quick to finish.
pub const REDUCE_CHUNKS: usize = 512;
/// Most blocks in a grid's y dimension.
const MAX_GRID_Y: usize = 65_535;
/// Chunks `partials_finish` sums side by side per column (`FINISH_LANES` in
/// kernels/reduce.cu).
const FINISH_LANES: u32 = 8;
/// Blocks of the sum-of-squares pass, and so the partials it leaves.
pub const SUM_BLOCKS: usize = 1024;
/// Grid-stride kernels never launch more blocks than this.
const MAX_BLOCKS: usize = 1 << 16;

/// The masked token rows of `seqs` sequences of `tokens` rows of `width` values each,
/// `masked` of them per sequence: what the masked-token gather and scatter move.
#[derive(Clone, Copy, Debug)]
pub struct MaskedRows {
    pub seqs: usize,
    pub tokens: usize,
    pub masked: usize,
    pub width: usize,
}

impl MaskedRows {
    /// The masked positions of model `m`'s windows (`T = 1 + K²`, `M` per window) in
    /// `seqs` sequences of `width`-wide tokens: LoMaR's encoder stream, MAE's decoder one.
    pub fn new(m: &ModelConfig, seqs: usize, width: usize) -> MaskedRows {
        MaskedRows {
            seqs,
            tokens: m.seq_len(),
            masked: m.masked_per_window(),
            width,
        }
    }
}

/// Floats of reduction scratch a model needs (see [`Kernels::gelu_backward`] and friends).
pub fn scratch_len(m: &ModelConfig) -> usize {
    // MAE's decoder blocks reduce over their own widths.
    let decoder = m.decoder.map_or(0, |dec| dec.hidden());
    let widest = m.hidden().max(3 * m.width).max(m.patch_dim()).max(decoder);
    (REDUCE_CHUNKS * widest).max(SUM_BLOCKS)
}

/// Rows per chunk and the chunk count of a two-pass column reduction over `rows`.
pub(super) fn chunking(rows: usize) -> (usize, usize) {
    let per = rows.div_ceil(REDUCE_CHUNKS).max(1);
    (per, rows.div_ceil(per))
}

pub(super) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernels' 32-bit indices"))
}

fn long(v: usize) -> i64 {
    v as i64
}

pub(super) fn blocks(n: usize, per_block: u32) -> Result<u32> {
    Ok(int(n.div_ceil(per_block as usize), "grid size")? as u32)
}

pub(super) fn config(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements, one pack of them per thread.
fn elementwise(n: usize) -> Result<LaunchConfig> {
    let packs = n.div_ceil(PACK);
    Ok(config(
        (
            blocks(packs.min(MAX_BLOCKS * THREADS as usize), THREADS)?,
            1,
        ),
        THREADS,
    ))
}

/// The block of the pack kernels over rows of `cols` values (kernels/common.cuh): blocks
/// across a row, threads per row (a pack each, whole warps, so no warp spans two rows) and
/// rows side by side, at most [`PACK_THREADS`] threads.
#[derive(Clone, Copy)]
struct PackTile {
    across: u32,
    per_row: u32,
    rows: u32,
}

fn pack_tile(cols: usize) -> PackTile {
    let packs = cols.div_ceil(PACK);
    let across = packs.div_ceil(PACK_THREADS);
    let per_row = packs.div_ceil(across).next_multiple_of(32);
    PackTile {
        across: across as u32,
        per_row: per_row as u32,
        rows: (PACK_THREADS / per_row).max(1) as u32,
    }
}

impl PackTile {
    /// Grid (blocks across, `ys`) of these blocks.
    fn config(self, ys: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.across, ys as u32, 1),
            block_dim: (self.per_row, self.rows, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride launch over `rows` rows.
    fn over_rows(self, rows: usize) -> LaunchConfig {
        self.config(rows.div_ceil(self.rows as usize).clamp(1, MAX_GRID_Y))
    }
}

/// The LayerNorm kernels' block: a whole row across one block.
fn layernorm_tile(width: usize) -> Result<PackTile> {
    if width == 0 || width > MAX_LAYERNORM_WIDTH {
        bail!("LayerNorm over {width} values: the kernels take 1 to {MAX_LAYERNORM_WIDTH}");
    }
    Ok(pack_tile(width))
}

/// Checks that a chunked partial buffer fits in the scratch.
pub(super) fn check_scratch(scratch: &DevPtr<f32>, need: usize, what: &str) -> Result<()> {
    if scratch.len() < need {
        bail!(
            "{what}: reduction scratch holds {} floats, needs {need}",
            scratch.len()
        );
    }
    Ok(())
}

impl<T: Storage> Kernels<T> {
    /// pixels [S/wpi, 3, side, side] u8 or f32 (as `source` says: the images, or one square
    /// per window; bytes are normalised on the way), window_origin [S,2] into them,
    /// pos_slot [S,K²]
    ///   -> patches [S*V, 3p²] T (c,y,x), targets [S*M, 3p²] f32 (y,x,c; norm-pix if set).
    #[allow(clippy::too_many_arguments)]
    pub fn window_gather<P: PixelValue>(
        &self,
        pixels: DevPtr<P>,
        window_origin: DevPtr<u32>,
        pos_slot: DevPtr<i32>,
        patches: DevPtr<T>,
        targets: DevPtr<f32>,
        m: &ModelConfig,
        source: PixelSource,
        seqs: usize,
    ) -> Result<()> {
        let (area, pd) = (m.window_area(), m.patch_dim());
        if seqs == 0 || !seqs.is_multiple_of(source.windows_per_image) {
            bail!("window_gather: {seqs} sequences is not a whole number of images");
        }
        if source.side < m.window * m.patch {
            bail!(
                "window_gather: {0}x{0}-pixel images hold no {1}x{1}-pixel window",
                source.side,
                m.window * m.patch
            );
        }
        pixels.check(source.len(seqs), "window_gather pixels")?;
        window_origin.check(seqs * 2, "window_gather window_origin")?;
        pos_slot.check(seqs * area, "window_gather pos_slot")?;
        patches.check(seqs * m.visible_per_window() * pd, "window_gather patches")?;
        targets.check(seqs * m.masked_per_window() * pd, "window_gather targets")?;
        let mut b = self.stream.launch_builder(P::gather(self));
        let windows = int(source.windows_per_image, "windows_per_image")?;
        let image = int(source.side, "image")?;
        let patch = int(m.patch, "patch")?;
        let window = int(m.window, "window")?;
        let norm_pix = i32::from(m.norm_pix);
        b.arg(pixels.addr())
            .arg(window_origin.addr())
            .arg(pos_slot.addr())
            .arg(patches.addr())
            .arg(targets.addr())
            .arg(&windows)
            .arg(&image)
            .arg(&patch)
            .arg(&window)
            .arg(&norm_pix);
        let grid = int(seqs * area, "window positions")? as u32;
        self.run(b, config((grid, 1), ROW_THREADS), "window_gather")
    }

    /// emb [S*V, D] T, patch_bias [D], cls [D], mask_token [D], pos_slot [S,K²]
    ///   -> x [S, 1+K², D] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble_tokens_forward(
        &self,
        emb: DevPtr<T>,
        patch_bias: DevPtr<f32>,
        cls: DevPtr<f32>,
        mask_token: DevPtr<f32>,
        pos_slot: DevPtr<i32>,
        x: DevPtr<f32>,
        m: &ModelConfig,
        seqs: usize,
    ) -> Result<()> {
        let (d, t) = (m.width, m.seq_len());
        emb.check(
            seqs * m.visible_per_window() * d,
            "assemble_tokens_forward emb",
        )?;
        patch_bias.check(d, "assemble_tokens_forward patch_bias")?;
        cls.check(d, "assemble_tokens_forward cls")?;
        mask_token.check(d, "assemble_tokens_forward mask_token")?;
        pos_slot.check(seqs * m.window_area(), "assemble_tokens_forward pos_slot")?;
        x.check(seqs * t * d, "assemble_tokens_forward x")?;
        let seq_len = int(t, "seq_len")?;
        let width = int(d, "width")?;
        let mut b = self.stream.launch_builder(&self.assemble_tokens_forward);
        b.arg(emb.addr())
            .arg(patch_bias.addr())
            .arg(cls.addr())
            .arg(mask_token.addr())
            .arg(pos_slot.addr())
            .arg(x.addr())
            .arg(&seq_len)
            .arg(&width);
        let grid = int(seqs * t, "token rows")? as u32;
        self.run(b, config((grid, 1), ROW_THREADS), "assemble_tokens_forward")
    }

    /// dx [S, 1+K², D] f32 -> demb [S*V, D] T (written); d_cls, d_mask_token,
    /// d_patch_bias [D] f32 (+=).
    #[allow(clippy::too_many_arguments)]
    pub fn assemble_tokens_backward(
        &self,
        dx: DevPtr<f32>,
        pos_slot: DevPtr<i32>,
        demb: DevPtr<T>,
        scratch: DevPtr<f32>,
        d_cls: DevPtr<f32>,
        d_mask_token: DevPtr<f32>,
        d_patch_bias: DevPtr<f32>,
        m: &ModelConfig,
        seqs: usize,
    ) -> Result<()> {
        let (d, t) = (m.width, m.seq_len());
        dx.check(seqs * t * d, "assemble_tokens_backward dx")?;
        pos_slot.check(seqs * m.window_area(), "assemble_tokens_backward pos_slot")?;
        demb.check(
            seqs * m.visible_per_window() * d,
            "assemble_tokens_backward demb",
        )?;
        let (per, chunks) = chunking(seqs);
        check_scratch(&scratch, 3 * chunks * d, "assemble_tokens_backward")?;
        let seqs_i = int(seqs, "sequences")?;
        let seq_len = int(t, "seq_len")?;
        let width = int(d, "width")?;
        let per_i = int(per, "sequences per chunk")?;
        let mut b = self.stream.launch_builder(&self.assemble_tokens_backward);
        b.arg(dx.addr())
            .arg(pos_slot.addr())
            .arg(demb.addr())
            .arg(scratch.addr())
            .arg(&seqs_i)
            .arg(&seq_len)
            .arg(&width)
            .arg(&per_i);
        let grid = (blocks(d, THREADS)?, chunks as u32);
        self.run(b, config(grid, THREADS), "assemble_tokens_backward")?;
        self.partials_finish(scratch, &[d_cls, d_mask_token, d_patch_bias], chunks, d)
    }

    /// x [S, T, D] f32, mask_index [S, M] -> xm [S*M, D] f32.
    pub fn gather_masked_tokens(
        &self,
        x: DevPtr<f32>,
        mask_index: DevPtr<u32>,
        xm: DevPtr<f32>,
        rows: MaskedRows,
    ) -> Result<()> {
        self.masked_rows(
            &self.gather_masked_tokens,
            "gather_masked_tokens",
            x,
            mask_index,
            xm,
            rows,
            true,
        )
    }

    /// dxm [S*M, D] f32, mask_index [S, M] -> dx [S, T, D] f32 (+= on the masked rows).
    pub fn scatter_masked_tokens(
        &self,
        dxm: DevPtr<f32>,
        mask_index: DevPtr<u32>,
        dx: DevPtr<f32>,
        rows: MaskedRows,
    ) -> Result<()> {
        self.masked_rows(
            &self.scatter_masked_tokens,
            "scatter_masked_tokens",
            dxm,
            mask_index,
            dx,
            rows,
            false,
        )
    }

    /// The gather and its adjoint share arguments: (source, mask_index, destination).
    #[allow(clippy::too_many_arguments)]
    fn masked_rows(
        &self,
        f: &CudaFunction,
        name: &str,
        src: DevPtr<f32>,
        mask_index: DevPtr<u32>,
        dst: DevPtr<f32>,
        rows: MaskedRows,
        gather: bool,
    ) -> Result<()> {
        let MaskedRows {
            seqs,
            tokens: t,
            masked: mk,
            width: d,
        } = rows;
        let (tokens, rows) = if gather { (src, dst) } else { (dst, src) };
        tokens.check(seqs * t * d, &format!("{name} tokens"))?;
        rows.check(seqs * mk * d, &format!("{name} masked rows"))?;
        mask_index.check(seqs * mk, &format!("{name} mask_index"))?;
        let masked = int(mk, "masked per window")?;
        let seq_len = int(t, "seq_len")?;
        let width = int(d, "width")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(src.addr())
            .arg(mask_index.addr())
            .arg(dst.addr())
            .arg(&masked)
            .arg(&seq_len)
            .arg(&width);
        let grid = int(seqs * mk, "masked rows")? as u32;
        self.run(b, config((grid, 1), ROW_THREADS), name)
    }

    /// x [N, D] f32, gamma, beta [D] -> y [N, D] T, mean [N], rstd [N].
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        x: DevPtr<f32>,
        gamma: DevPtr<f32>,
        beta: DevPtr<f32>,
        y: DevPtr<T>,
        mean: DevPtr<f32>,
        rstd: DevPtr<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        x.check(rows * width, "layernorm_forward x")?;
        gamma.check(width, "layernorm_forward gamma")?;
        beta.check(width, "layernorm_forward beta")?;
        y.check(rows * width, "layernorm_forward y")?;
        mean.check(rows, "layernorm_forward mean")?;
        rstd.check(rows, "layernorm_forward rstd")?;
        let rows_i = int(rows, "rows")?;
        let width_i = int(width, "width")?;
        let tile = layernorm_tile(width)?;
        let mut b = self.stream.launch_builder(&self.layernorm_forward);
        b.arg(x.addr())
            .arg(gamma.addr())
            .arg(beta.addr())
            .arg(y.addr())
            .arg(mean.addr())
            .arg(rstd.addr())
            .arg(&rows_i)
            .arg(&width_i);
        self.run(b, tile.over_rows(rows), "layernorm_forward")
    }

    /// x [N, D] f32, dy [N, D] T, gamma [D], mean, rstd [N]
    ///   -> dx [N, D] f32 (+=), d_gamma, d_beta [D] f32 (+=), in one pass over the rows;
    /// with `dx_copy`, also the updated dx [N, D] in storage type; with `dx_bias_grad`, the
    /// column sums of the updated dx added into it (the gradient of the bias that was added
    /// into the residual stream just before this LayerNorm).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        x: DevPtr<f32>,
        dy: DevPtr<T>,
        gamma: DevPtr<f32>,
        mean: DevPtr<f32>,
        rstd: DevPtr<f32>,
        dx: DevPtr<f32>,
        dx_copy: Option<DevPtr<T>>,
        d_gamma: DevPtr<f32>,
        d_beta: DevPtr<f32>,
        dx_bias_grad: Option<DevPtr<f32>>,
        scratch: DevPtr<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        x.check(rows * width, "layernorm_backward x")?;
        dy.check(rows * width, "layernorm_backward dy")?;
        gamma.check(width, "layernorm_backward gamma")?;
        mean.check(rows, "layernorm_backward mean")?;
        rstd.check(rows, "layernorm_backward rstd")?;
        dx.check(rows * width, "layernorm_backward dx")?;
        if let Some(copy) = &dx_copy {
            copy.check(rows * width, "layernorm_backward dx_copy")?;
        }
        let tile = layernorm_tile(width)?;
        let (per, chunks) = chunking(rows);
        check_scratch(&scratch, 3 * chunks * width, "layernorm_backward")?;
        let rows_i = int(rows, "rows")?;
        let width_i = int(width, "width")?;
        let per_i = int(per, "rows per chunk")?;
        let copy_addr = dx_copy.map_or(0, |p| *p.addr());
        let mut b = self.stream.launch_builder(&self.layernorm_backward);
        b.arg(x.addr())
            .arg(dy.addr())
            .arg(gamma.addr())
            .arg(mean.addr())
            .arg(rstd.addr())
            .arg(dx.addr())
            .arg(&copy_addr)
            .arg(scratch.addr())
            .arg(&rows_i)
            .arg(&width_i)
            .arg(&per_i);
        self.run(b, tile.config(chunks), "layernorm_backward")?;
        let outputs: Vec<DevPtr<f32>> = [Some(d_gamma), Some(d_beta), dx_bias_grad]
            .into_iter()
            .flatten()
            .collect();
        self.partials_finish(scratch, &outputs, chunks, width)
    }

    /// pre [N, C] T -> act [N, C] T = gelu(pre).
    pub fn gelu_forward(
        &self,
        pre: DevPtr<T>,
        act: DevPtr<T>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        pre.check(n, "gelu_forward pre")?;
        act.check(n, "gelu_forward act")?;
        let (rows_i, cols_i) = (int(rows, "rows")?, int(cols, "cols")?);
        let mut b = self.stream.launch_builder(&self.gelu_forward);
        b.arg(pre.addr()).arg(act.addr()).arg(&rows_i).arg(&cols_i);
        self.run(b, pack_tile(cols).over_rows(rows), "gelu_forward")
    }

    /// pre [N, C] T (with bias), grad [N, C] T: d act in, d pre out; bias_grad [C] f32 +=
    /// the column sums of d pre (fc1's bias gradient).
    pub fn gelu_backward(
        &self,
        pre: DevPtr<T>,
        grad: DevPtr<T>,
        rows: usize,
        cols: usize,
        scratch: DevPtr<f32>,
        bias_grad: DevPtr<f32>,
    ) -> Result<()> {
        pre.check(rows * cols, "gelu_backward pre")?;
        grad.check(rows * cols, "gelu_backward grad")?;
        let (per, chunks) = chunking(rows);
        check_scratch(&scratch, chunks * cols, "gelu_backward")?;
        let (rows_i, cols_i) = (int(rows, "rows")?, int(cols, "cols")?);
        let per_i = int(per, "rows per chunk")?;
        let mut b = self.stream.launch_builder(&self.gelu_backward);
        b.arg(pre.addr())
            .arg(grad.addr())
            .arg(scratch.addr())
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&per_i);
        self.run(b, pack_tile(cols).config(chunks), "gelu_backward")?;
        self.partials_finish(scratch, &[bias_grad], chunks, cols)
    }

    /// pred [Nm, P] T, bias [P] f32, target [Nm, P] f32
    ///   -> dpred [Nm, P] T = grad_scale * dloss/dpred, row_loss [Nm], loss [1] f32 += the
    ///      mean (a step's loss sum over its micro-batches).
    #[allow(clippy::too_many_arguments)]
    pub fn masked_mse(
        &self,
        pred: DevPtr<T>,
        bias: DevPtr<f32>,
        target: DevPtr<f32>,
        dpred: DevPtr<T>,
        row_loss: DevPtr<f32>,
        loss: DevPtr<f32>,
        rows: usize,
        cols: usize,
        grad_scale: f32,
    ) -> Result<()> {
        pred.check(rows * cols, "masked_mse pred")?;
        bias.check(cols, "masked_mse bias")?;
        target.check(rows * cols, "masked_mse target")?;
        dpred.check(rows * cols, "masked_mse dpred")?;
        row_loss.check(rows, "masked_mse row_loss")?;
        let count = (rows * cols) as f64;
        let grad_coef = (grad_scale as f64 * 2.0 / count) as f32;
        let cols_i = int(cols, "cols")?;
        let mut b = self.stream.launch_builder(&self.masked_mse);
        b.arg(pred.addr())
            .arg(bias.addr())
            .arg(target.addr())
            .arg(dpred.addr())
            .arg(row_loss.addr())
            .arg(&cols_i)
            .arg(&grad_coef);
        let grid = int(rows, "rows")? as u32;
        self.run(b, config((grid, 1), ROW_THREADS), "masked_mse")?;
        self.sum(row_loss.range(0..rows)?, (1.0 / count) as f32, true, loss)
    }

    /// One AdamW step over the flat buffers; writes the storage copy of the weights. The
    /// step's constants come from `hyper`, the gradient scale and the divergence flag from
    /// `state` (kernels/step_state.cuh); under a raised flag nothing changes.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        params: DevPtr<f32>,
        grads: DevPtr<f32>,
        m: DevPtr<f32>,
        v: DevPtr<f32>,
        decay_mask: DevPtr<u8>,
        shadow: DevPtr<T>,
        hyper: DevPtr<f32>,
        state: DevPtr<f32>,
    ) -> Result<()> {
        let n = params.len();
        grads.check(n, "adamw grads")?;
        m.check(n, "adamw m")?;
        v.check(n, "adamw v")?;
        decay_mask.check(n, "adamw decay_mask")?;
        shadow.check(n, "adamw shadow")?;
        hyper.check(HYPER_LEN, "adamw hyper")?;
        state.check(STATE_LEN, "adamw state")?;
        let n_l = long(n);
        let mut b = self.stream.launch_builder(&self.adamw);
        b.arg(params.addr())
            .arg(grads.addr())
            .arg(m.addr())
            .arg(v.addr())
            .arg(decay_mask.addr())
            .arg(shadow.addr())
            .arg(&n_l)
            .arg(hyper.addr())
            .arg(state.addr());
        self.run(b, elementwise(n)?, "adamw")
    }

    /// partial [outputs.len(), chunks, C] f32 -> outputs[k] [C] f32 (+=), at most three.
    pub(super) fn partials_finish(
        &self,
        partial: DevPtr<f32>,
        outputs: &[DevPtr<f32>],
        chunks: usize,
        cols: usize,
    ) -> Result<()> {
        if outputs.is_empty() || outputs.len() > 3 {
            bail!(
                "partials_finish: {} outputs, it takes 1 to 3",
                outputs.len()
            );
        }
        partial.check(outputs.len() * chunks * cols, "partials_finish partial")?;
        for out in outputs {
            out.check(cols, "partials_finish out")?;
        }
        // Unused output slots repeat the first; the kernel never reaches them.
        let addr = |k: usize| *outputs.get(k).unwrap_or(&outputs[0]).addr();
        let (out0, out1, out2) = (addr(0), addr(1), addr(2));
        let chunks_i = int(chunks, "chunks")?;
        let cols_i = int(cols, "cols")?;
        let mut b = self.stream.launch_builder(&self.partials_finish);
        b.arg(partial.addr())
            .arg(&out0)
            .arg(&out1)
            .arg(&out2)
            .arg(&chunks_i)
            .arg(&cols_i);
        let cfg = LaunchConfig {
            grid_dim: (blocks(cols, 32)?, outputs.len() as u32, 1),
            block_dim: (32, FINISH_LANES, 1),
            shared_mem_bytes: 0,
        };
        self.run(b, cfg, "partials_finish")
    }

    /// x [n] f32 -> out [1] f32 = sum of squares.
    pub fn sum_squares(
        &self,
        x: DevPtr<f32>,
        scratch: DevPtr<f32>,
        out: DevPtr<f32>,
    ) -> Result<()> {
        let partials = self.sum_squares_partial(x, scratch)?;
        self.sum(partials, 1.0, false, out)
    }

    /// The end of a step before its update: grads [n] f32, loss_sum [1] f32 (the
    /// micro-batches' mean losses added up), hyper [HYPER_LEN] -> state [STATE_LEN]: the
    /// mean loss, the gradient norm, the clip scale and the divergence flag.
    pub fn step_finish(
        &self,
        grads: DevPtr<f32>,
        scratch: DevPtr<f32>,
        loss_sum: DevPtr<f32>,
        hyper: DevPtr<f32>,
        state: DevPtr<f32>,
    ) -> Result<()> {
        loss_sum.check(1, "step_finish loss_sum")?;
        hyper.check(HYPER_LEN, "step_finish hyper")?;
        state.check(STATE_LEN, "step_finish state")?;
        let partials = self.sum_squares_partial(grads, scratch)?;
        let n_i = int(partials.len(), "values to sum")?;
        let mut b = self.stream.launch_builder(&self.step_finish);
        b.arg(partials.addr())
            .arg(&n_i)
            .arg(loss_sum.addr())
            .arg(hyper.addr())
            .arg(state.addr());
        self.run(b, config((1, 1), 1024), "step_finish")
    }

    /// x [n] f32 -> the partial sums of squares in the front of `scratch`, returned.
    fn sum_squares_partial<'s>(
        &self,
        x: DevPtr<f32>,
        scratch: DevPtr<'s, f32>,
    ) -> Result<DevPtr<'s, f32>> {
        let n = x.len();
        let grid = n.div_ceil(THREADS as usize).clamp(1, SUM_BLOCKS);
        check_scratch(&scratch, grid, "sum_squares")?;
        let n_l = long(n);
        let mut b = self.stream.launch_builder(&self.sum_squares_partial);
        b.arg(x.addr()).arg(&n_l).arg(scratch.addr());
        self.run(b, config((grid as u32, 1), THREADS), "sum_squares_partial")?;
        scratch.range(0..grid)
    }

    /// x [n] f32 -> out [1] f32 = scale * sum(x) (or += it when `accumulate`), in one
    /// block.
    fn sum(&self, x: DevPtr<f32>, scale: f32, accumulate: bool, out: DevPtr<f32>) -> Result<()> {
        out.check(1, "sum out")?;
        let n_i = int(x.len(), "values to sum")?;
        let accumulate_i = i32::from(accumulate);
        let mut b = self.stream.launch_builder(&self.sum_finish);
        b.arg(x.addr())
            .arg(&n_i)
            .arg(&scale)
            .arg(&accumulate_i)
            .arg(out.addr());
        self.run(b, config((1, 1), 1024), "sum_finish")
    }

    /// src [n] f32 -> dst [n] T.
    pub fn cast_from_f32(&self, src: DevPtr<f32>, dst: DevPtr<T>, n: usize) -> Result<()> {
        src.check(n, "cast_from_f32 src")?;
        dst.check(n, "cast_from_f32 dst")?;
        let n_l = long(n);
        let mut b = self.stream.launch_builder(&self.cast_from_f32);
        b.arg(src.addr()).arg(dst.addr()).arg(&n_l);
        self.run(b, elementwise(n)?, "cast_from_f32")
    }
}
